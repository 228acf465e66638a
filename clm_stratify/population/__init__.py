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

__all__ = ["run_population", "restratify", "InputError", "Summary"]


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat()


def _is_uri(text: str) -> bool:
    return "://" in text and not text.startswith("file://")


def run_population(sources: list[str], out: str, rules: Rules, *, master: str | None = None, workers: int = 1,
                   base: str | None = None, occurrence: str | None = None,
                   progress: Callable[[int], None] | None = None) -> Summary:
    """Classify every patient of the NDJSON ``sources`` into ``out`` (local, or Spark with ``master``)."""
    occurrence = occurrence or now()
    config = CoreConfig.of(rules, occurrence, base)
    if master is None:
        remote = [s for s in [*sources, out] if _is_uri(s)]
        if remote:
            raise InputError(f"{remote[0]}: a URI needs --master (Spark reads it); without --master the files "
                             "and --out are local paths")
        out_path = Path(out)
        prepare_out(out_path)
        summary = run_local(sources, out_path, config, rules.terminology, workers=workers, progress=progress)
        write_manifest(out_path, manifest(summary, rules=rules, occurrence=occurrence, base=config.base,
                                          source="ndjson"))
        return summary
    from clm_stratify.population.spark import run_spark

    local_out = not _is_uri(out)
    if local_out:
        prepare_out(Path(out.removeprefix("file://")))
        for s in sources:
            if not _is_uri(s) and not Path(s.removeprefix("file://")).exists():
                raise InputError(f"{s}: no such file or directory")
    summary = run_spark(sources, out, config, rules.terminology, master)
    data = manifest(summary, rules=rules, occurrence=occurrence, base=config.base, source="ndjson")
    if local_out:
        write_manifest(Path(out.removeprefix("file://")), data)
    else:
        _write_remote_manifest(master, out, data)
    return summary


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


def restratify(features_from: str, out: str, rules: Rules, *, occurrence: str | None = None,
               progress: Callable[[int], None] | None = None) -> Summary:
    """Classify the features of an earlier run with ``rules`` (no NDJSON, no mapping)."""
    from pydantic import ValidationError

    from clm_stratify.population.core import features_of

    run, earlier = features_dir(features_from)
    mapped_with = (earlier.get("terminology") or {}).get("sha256")
    if mapped_with != terminology_sha256(rules.terminology):
        raise InputError(f"{run}: its features were mapped with another terminology ({earlier['terminology'].get('id')} "
                         f"{earlier['terminology'].get('version')}); a terminology change needs a new mapping: run "
                         "population --ndjson again")
    occurrence = occurrence or now()
    config = CoreConfig.of(rules, occurrence, earlier.get("base"))
    out_path = Path(out)
    prepare_out(out_path)
    for kind in KINDS:
        (out_path / kind).mkdir()
    summary = Summary(engine="local, from features", inputs=[str(run / "features")])

    def features():
        for path, n, line in read_lines(run, "features"):
            try:
                yield features_of(line)
            except ValidationError as exc:
                raise InputError(f"{path}:{n}: not a features line ({exc.errors()[0]['msg']})") from None
            except ValueError as exc:
                raise InputError(f"{path}:{n}: not a features line ({exc})") from None

    for i, chunk in enumerate(batched(features(), 5000)):
        summary.add(write_chunk(out_path, i, classify_features(chunk, config)))
        if progress:
            progress(summary.patients)
    data = manifest(summary, rules=rules, occurrence=occurrence, base=config.base, source="features")
    data["restratified_from"] = {"out": str(run), "ruleset": earlier.get("ruleset")}
    write_manifest(out_path, data)
    return summary
