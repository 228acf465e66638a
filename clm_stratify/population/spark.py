"""The population path on Apache Spark (PySpark DataFrame API, ``pip install 'clm-stratify[spark]'``).

1. Read the NDJSON as text (``lineSep`` ``\\n``, ``*.ndjson`` / ``*.ndjson.gz``).
2. Key and filter every line **on the JVM** (:func:`fhir_adapters.sources.ndjson.spark_line_columns`,
   proven equal to the Python rules by ``tests/unit/test_ndjson_keys.py``); only the
   lines the JVM cannot parse go through Python (:func:`~fhir_adapters.sources.ndjson.read_line`).
   Unreadable lines stop the run before anything is classified.
3. Drop what the mapping cannot use, *then* shuffle: group each patient's lines, and join
   the shared resources (Medication, BodyStructure) to the patients whose lines
   reference them (a join by reference, not a copy to every patient).
4. ``mapInArrow`` into the core (:mod:`clm_stratify.population.core`): the rules travel
   as data; each Python worker builds its durable-rules engine once, on first use.
5. Write each output kind as text under ``OUT/<kind>/`` and the manifest last.

The worker Python is this interpreter unless ``PYSPARK_PYTHON`` says otherwise. On a
cluster (``spark://``, ``k8s://``, ``yarn``, ``sc://``) the project's packages are
shipped with the job; the workers need the same Python with the dependencies installed
(durable-rules, fhir.resources, pyarrow): see the README.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Iterator

from clm_stratify.population.core import KINDS, CoreConfig, classify_records
from clm_stratify.population.local import MAX_BROADCAST, SHOWN_ERRORS
from clm_stratify.population.output import InputError, Summary
from fhir_adapters.sources.ndjson import BadLine, Prefilter, read_line, spark_line_columns
from fhir_adapters.terminology import Terminology

#: Rows per Arrow batch handed to the core (the core classifies 200 patients per engine call).
ARROW_BATCH = 1000
_KEY_SCHEMA = ("line string, file string, resource_type string, owner string, joined string, "
               "wants array<string>, kept boolean, error string")
_OUT_SCHEMA = "patient string, kind string, grp string, text string"
_PACKAGES = ("clm_stratify", "engine", "fhir_adapters", "rules")


def is_local(master: str) -> bool:
    return master == "local" or master.startswith("local[")


def session(master: str) -> Any:
    """A SparkSession for ``master`` (``local[N]``, ``spark://``, ``k8s://``, ``yarn``, or
    ``sc://`` for Spark Connect)."""
    try:
        from pyspark.sql import SparkSession
    except ImportError:
        raise InputError("--master needs PySpark: pip install 'clm-stratify[spark]' (and Java 17)") from None
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    if master.startswith("sc://"):
        builder = SparkSession.builder.remote(master)
    else:
        os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
        builder = SparkSession.builder.master(master).config("spark.ui.showConsoleProgress", "false")
        if is_local(master):
            builder = builder.config("spark.ui.enabled", "false").config("spark.sql.shuffle.partitions", "8")
    builder = (builder.appName("clm-stratify population")
               .config("spark.sql.variant.allowDuplicateKeys", "true")   # the last repeated key wins, as in Python
               .config("spark.sql.execution.arrow.maxRecordsPerBatch", str(ARROW_BATCH)))
    spark = builder.getOrCreate()
    if not master.startswith("sc://"):
        spark.sparkContext.setLogLevel("ERROR")
    if not is_local(master):
        _ship_code(spark, master)
    return spark


def _ship_code(spark: Any, master: str) -> None:
    """Send the project's packages to the cluster's Python workers."""
    root = Path(__file__).resolve().parents[2]
    zpath = Path(tempfile.mkdtemp(prefix="clm-stratify-code-")) / "clm_stratify_code.zip"
    with zipfile.ZipFile(zpath, "w") as z:
        for package in _PACKAGES:
            for f in (root / package).rglob("*"):
                if f.is_file() and f.suffix in (".py", ".yaml") and "__pycache__" not in f.parts:
                    z.write(f, f.relative_to(root))
    if master.startswith("sc://"):
        spark.addArtifacts(str(zpath), pyfile=True)
    else:
        spark.sparkContext.addPyFile(str(zpath))


def _python_keys(prefilter: Prefilter, base: str | None):
    """For mapInArrow: the Python answer for lines the JVM could not read."""
    def keys(batches: Iterator[Any]) -> Iterator[Any]:
        import pyarrow as pa

        for batch in batches:
            out: dict[str, list] = {k: [] for k in ("line", "file", "resource_type", "owner", "joined", "wants",
                                                    "kept", "error")}
            for line, file in zip(batch.column("line").to_pylist(), batch.column("file").to_pylist()):
                try:
                    read = read_line(line, prefilter, base)
                except BadLine as exc:
                    row = (line, file, None, None, None, [], False, str(exc))
                else:
                    if read is None:
                        continue   # blank
                    info = read[1]
                    row = (line, file, info.resource_type, info.owner, info.joined, list(info.wants), info.kept, None)
                for k, value in zip(out, row):
                    out[k].append(value)
            yield pa.RecordBatch.from_pydict(out, schema=_arrow_schema(_KEY_SCHEMA))
    return keys


def _core(config: CoreConfig, broadcast: list[str]):
    """For mapInArrow: whole-patient records -> output rows (the core)."""
    def run(batches: Iterator[Any]) -> Iterator[Any]:
        import pyarrow as pa

        schema = _arrow_schema(_OUT_SCHEMA)
        for batch in batches:
            records = zip(batch.column("patient").to_pylist(), batch.column("lines").to_pylist())
            out: dict[str, list] = {"patient": [], "kind": [], "grp": [], "text": []}
            for row in classify_records(records, config, broadcast):
                out["patient"].append(row.patient)
                out["kind"].append(row.kind)
                out["grp"].append(row.group)
                out["text"].append(row.text)
            yield pa.RecordBatch.from_pydict(out, schema=schema)
    return run


def _arrow_schema(ddl: str) -> Any:
    import pyarrow as pa

    types = {"string": pa.string(), "boolean": pa.bool_(), "array<string>": pa.list_(pa.string())}
    fields = []
    for part in ddl.split(", "):
        name, kind = part.split(" ", 1)
        fields.append(pa.field(name, types[kind]))
    return pa.schema(fields)


def keyed_lines(spark: Any, sources: list[str], prefilter: Prefilter, base: str | None) -> Any:
    """Every non-blank line with its key columns (see the module docstring, step 2)."""
    from pyspark.sql import functions as F

    lines = (spark.read.option("lineSep", "\n").option("pathGlobFilter", "*.{ndjson,ndjson.gz}")
             .text(sources).select(F.col("value").alias("line"), F.input_file_name().alias("file")))
    cols = spark_line_columns(F, F.col("line"), prefilter, base)
    keyed = lines.select("line", "file", *(c.alias(n) for n, c in cols.items()))
    jvm = keyed.filter(F.col("parsed")).select("line", "file", "resource_type", "owner", "joined", "wants", "kept",
                                               F.lit(None).cast("string").alias("error"))
    python = keyed.filter(~F.col("parsed")).select("line", "file").mapInArrow(_python_keys(prefilter, base),
                                                                              _KEY_SCHEMA)
    return jvm.unionByName(python)


def run_spark(sources: list[str], out: str, config: CoreConfig, terminology: Terminology, master: str) -> Summary:
    """Classify every patient of ``sources`` into ``out`` on Spark."""
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    spark = session(master)
    summary = Summary(engine=f"spark {master}", inputs=list(sources))
    summary.lines_read = None   # not counted on Spark (it would cost a pass over the input)
    try:
        selected = keyed_lines(spark, sources, Prefilter.of(terminology), config.base).filter(
            F.col("kept") | F.col("error").isNotNull()).persist(StorageLevel.MEMORY_AND_DISK)
        try:
            _refuse_unreadable(selected)
            kept = selected.filter(F.col("kept"))
            broadcast_rows = kept.filter(F.col("owner").isNull() & (F.col("resource_type") != F.lit("Medication")))
            n_broadcast = broadcast_rows.count()
            if n_broadcast > MAX_BROADCAST:
                raise InputError(f"{n_broadcast} resources name no patient by a literal reference; each would go "
                                 f"to every patient's record (more than {MAX_BROADCAST}): check how the export "
                                 "names its patients (--base for absolute references)")
            broadcast = [r["line"] for r in broadcast_rows.select("line").collect()]
            summary.broadcast = len(broadcast)
            summary.lines_kept = kept.count()
            own = kept.filter(F.col("owner").isNotNull()).select(F.col("owner").alias("patient"), "line")
            shared = kept.filter(F.col("joined").isNotNull()).select(F.col("joined").alias("ref"), "line")
            wants = (kept.filter(F.col("owner").isNotNull())
                     .select(F.col("owner").alias("patient"), F.explode("wants").alias("ref")).distinct())
            joined = wants.join(shared, "ref").select("patient", "line")
            records = (own.unionByName(joined).groupBy("patient")
                       .agg(F.array_sort(F.array_distinct(F.collect_list("line"))).alias("lines")))
            result = records.mapInArrow(_core(config, broadcast), _OUT_SCHEMA).persist(StorageLevel.MEMORY_AND_DISK)
            try:
                for kind in KINDS:
                    (result.filter(F.col("kind") == F.lit(kind)).select("text")
                     .write.mode("errorifexists").text(f"{out.rstrip('/')}/{kind}"))
                counts: dict[str, dict] = {}
                for row in result.groupBy("kind", "grp").count().collect():
                    counts.setdefault(row["kind"], {})[row["grp"] or ""] = row["count"]
                failed = {r["patient"]: r["text"] for r in
                          result.filter(F.col("kind") == F.lit("failures")).select("patient", "text").collect()}
                if failed:
                    counts["_failed"] = failed
                summary.add(counts)
            finally:
                result.unpersist()
        finally:
            selected.unpersist()
    finally:
        if is_local(master):
            spark.stop()
    return summary


def _refuse_unreadable(selected: Any) -> None:
    from pyspark.sql import functions as F

    bad = selected.filter(F.col("error").isNotNull())
    n = bad.count()
    if n:
        shown = [f"{r['file']}: {r['error']}: {json.dumps(r['start'])}"
                 for r in bad.select("file", "error", F.substring("line", 1, 60).alias("start"))
                 .limit(SHOWN_ERRORS).collect()]
        more = f" (and {n - len(shown)} more)" if n > len(shown) else ""
        raise InputError(f"{n} unreadable line(s); nothing was classified:\n  " + "\n  ".join(shown) + more)
