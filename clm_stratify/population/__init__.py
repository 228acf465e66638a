"""Population runs: every patient of a FHIR NDJSON export (or of features mapped earlier)
classified into an ``OUT`` directory, on this machine or on Apache Spark; writing the
assessments to a FHIR server is a separate step (:mod:`clm_stratify.population.writeback`).

    core.py       the one engine-agnostic core (records -> rows), used by both paths
    local.py      one machine: NDJSON -> SQLite spool -> core (one or more processes)
    spark.py      Apache Spark: JVM keying and filtering, shuffle, mapInArrow into the core
    output.py     the OUT layout and its manifest
    writeback.py  ``clm-stratify write-back``: OUT -> FHIR server, bounded and resumable
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Callable

from clm_stratify.pipeline import Rules
from clm_stratify.population.core import KINDS, CoreConfig, classify_features
from clm_stratify.population.local import run_local, write_chunk, batched
from clm_stratify.population.output import (InputError, Summary, manifest, prepare_out, read_lines, read_manifest,
                                            terminology_sha256, write_manifest)

__all__ = ["run_population", "restratify", "InputError", "SparkJobFailed", "Summary"]


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat()


def _is_uri(text: str) -> bool:
    return "://" in text and not text.startswith("file://")


def run_population(sources: list[str], out: str, rules: Rules, *, master: str | None = None, workers: int = 1,
                   base: str | None = None, occurrence: str | None = None,
                   progress: Callable[[int], None] | None = None) -> Summary:
    """Classify every patient of the NDJSON ``sources`` into ``out`` (local, or Spark with ``master``).
    Local sources are listed first (:func:`ndjson_files`: a file that would not be read is
    refused), and Spark is given exactly those files. A run that fails leaves ``out`` as
    it found it (absent or empty)."""
    from fhir_adapters.sources.ndjson import ndjson_files

    occurrence = occurrence or now()
    config = CoreConfig.of(rules, occurrence, base)
    if master is None:
        remote = [s for s in [*sources, out] if _is_uri(s)]
        if remote:
            raise InputError(f"{remote[0]}: a URI needs --master (Spark reads it); without --master the files "
                             "and --out are local paths")
    files = [str(f) for s in sources if not _is_uri(s) for f in ndjson_files(s.removeprefix("file://"))]
    files += [s for s in sources if _is_uri(s)]
    local_out = not _is_uri(out)
    out_path = Path(out.removeprefix("file://"))
    created = local_out and not out_path.exists()
    if local_out:
        prepare_out(out_path)
    try:
        if master is None:
            summary = run_local(files, out_path, config, rules.terminology, workers=workers, progress=progress)
        else:
            summary = _spark(files, out, config, rules, master)
    except BaseException:
        if local_out:
            _undo(out_path, created)
        raise
    data = manifest(summary, rules=rules, occurrence=occurrence, base=config.base, source="ndjson")
    if local_out:
        write_manifest(out_path, data)
    else:
        _write_remote_manifest(master, out, data)
    return summary


class SparkJobFailed(RuntimeError):
    """The Spark job failed (its first line says why); nothing of the run is usable."""


def _spark(files: list[str], out: str, config: CoreConfig, rules: Rules, master: str) -> Summary:
    from clm_stratify.population.spark import run_spark

    try:
        return run_spark(files, out, config, rules.terminology, master)
    except (InputError, KeyboardInterrupt):
        raise
    except Exception as exc:
        if type(exc).__module__.split(".")[0] not in ("py4j", "pyspark"):
            raise
        first = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise SparkJobFailed(f"the Spark job failed: {first[:400]}") from None


def _undo(out: Path, created: bool) -> None:
    """Remove what a failed run wrote (``out`` was absent or empty when it started)."""
    import shutil

    if not out.is_dir():
        return
    if created:
        shutil.rmtree(out, ignore_errors=True)
        return
    for entry in out.iterdir():
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def _write_remote_manifest(master: str, out: str, data: dict) -> None:
    import json

    from clm_stratify.population.spark import session

    spark = session(master)
    spark.createDataFrame([(json.dumps(data),)], "value string").coalesce(1).write.text(f"{out.rstrip('/')}/_manifest")


def features_dir(path: str) -> tuple[Path, dict]:
    """``OUT`` or ``OUT/features`` of a finished run -> (OUT, its manifest)."""
    p = Path(path)
    run = p if (p / "manifest.json").exists() or p.name != "features" else p.parent
    return run, read_manifest(run)


def checked_features_run(features_from: str, terminology) -> tuple[Path, dict]:
    """``OUT`` (or ``OUT/features``) of a finished run whose features can be read back with
    ``terminology``: (OUT, its manifest). InputError when they were mapped with another
    terminology, or the files do not hold the lines the manifest counts."""
    run, earlier = features_dir(features_from)
    mapped_with = earlier.get("terminology") or {}
    if mapped_with.get("sha256") != terminology_sha256(terminology):
        raise InputError(f"{run}: its features were mapped with another terminology ({mapped_with.get('id')} "
                         f"{mapped_with.get('version')}) than {terminology.id} {terminology.version}: give that "
                         "terminology with --terminology, or map again (population --ndjson)")
    expected = ((earlier.get("counts") or {}).get("outputs") or {}).get("features")
    found = sum(1 for _ in read_lines(run, "features"))
    if found != expected:
        raise InputError(f"{run}/features: {found} lines, the manifest says {expected}: the run's files were changed "
                         "or cut; run population --ndjson again")
    return run, earlier


def stored_features(run: Path):
    """The features of a finished run, line by line, each read strictly; InputError
    naming the file and line of the first that is not a features line."""
    from pydantic import ValidationError

    from clm_stratify.population.core import features_of

    for path, n, line in read_lines(run, "features"):
        try:
            yield features_of(line)
        except ValidationError as exc:
            first = exc.errors()[0]
            raise InputError(f"{path}:{n}: not a features line ({'.'.join(map(str, first['loc']))}: "
                             f"{first['msg']})") from None
        except ValueError as exc:
            raise InputError(f"{path}:{n}: not a features line ({exc})") from None


def restratify(features_from: str, out: str, rules: Rules, *, occurrence: str | None = None,
               progress: Callable[[int], None] | None = None) -> Summary:
    """Classify the features of an earlier run with ``rules`` (no NDJSON, no mapping)."""
    run, earlier = checked_features_run(features_from, rules.terminology)
    occurrence = occurrence or now()
    config = CoreConfig.of(rules, occurrence, earlier.get("base"))
    out_path = Path(out)
    created = not out_path.exists()
    prepare_out(out_path)
    try:
        summary = _restratify(run, out_path, config, progress)
    except BaseException:
        _undo(out_path, created)
        raise
    data = manifest(summary, rules=rules, occurrence=occurrence, base=config.base, source="features")
    data["restratified_from"] = {"out": str(run), "ruleset": earlier.get("ruleset")}
    write_manifest(out_path, data)
    return summary


def _restratify(run: Path, out: Path, config: CoreConfig, progress: Callable[[int], None] | None) -> Summary:
    for kind in KINDS:
        (out / kind).mkdir()
    summary = Summary(engine="local, from features", inputs=[str(run / "features")])
    for i, chunk in enumerate(batched(stored_features(run), 5000)):
        summary.add(write_chunk(out, i, classify_features(chunk, config)))
        if progress:
            progress(summary.patients)
    return summary
