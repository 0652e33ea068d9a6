"""Where results came from: machine facts, resolved training precision, and the `runs` row that keeps them."""
import json
from datetime import datetime, timedelta, timezone

import duckdb

from pd_eval.schema import RunRow
from pd_eval.provenance import (_cpuinfo, cpu_flags, cpu_model, describe_machine, machine_facts, run_provenance,
                                training_precision)
from pd_eval.store import query, write_run

ARM64_CPUINFO = """processor\t: 0
BogoMIPS\t: 50.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid bf16
CPU implementer\t: 0x41
CPU architecture: 8
CPU part\t: 0xd0c

processor\t: 1
Features\t: fp asimd
"""


def test_machine_facts_are_json_and_name_this_machine():
    import torch

    facts = json.loads(json.dumps(machine_facts()))
    assert facts["arch"] and facts["cpu"] and facts["torch_threads"] == torch.get_num_threads()
    assert set(facts["versions"]) == {"python", "torch", "diffusers", "transformers", "numpy", "prefect", "clean-fid", "duckdb"}
    assert facts["versions"]["torch"] == torch.__version__.split("+")[0]
    assert isinstance(facts["amx_bf16"], bool) and isinstance(facts["avx512_bf16"], bool)  # this Linux lists flags
    assert all({"library", "threads"} <= set(b) for b in facts["blas"])
    assert facts["cpu"] in describe_machine(facts)


def test_an_arm64_or_unreadable_cpuinfo_still_gives_facts(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text(ARM64_CPUINFO)
    info = _cpuinfo(path)
    assert cpu_model(info) == "CPU implementer 0x41, part 0xd0c"  # arm64 names no "model name"
    assert cpu_flags(info) == {"amx_bf16": False, "avx512_bf16": False}  # its "Features", first processor's
    missing = _cpuinfo(tmp_path / "absent")
    assert missing == {} and cpu_flags(missing) == {"amx_bf16": None, "avx512_bf16": None}
    assert "? AVX-512 bf16" in describe_machine({**machine_facts(), "avx512_bf16": None})


def test_training_precision_is_resolved_for_the_device():
    assert training_precision("auto", "cpu", "train.mixed_precision")["resolved"] == "fp32"  # auto is fp32 on a CPU
    assert training_precision("bf16", "cpu", "base.mixed_precision")["resolved"] == "bfloat16"
    base, train = ({"machine": {"cpu": c}, "precision": training_precision(p, "cpu", k)}
                   for c, p, k in (("Xeon", "no", "base.mixed_precision"), ("EPYC", "bf16", "train.mixed_precision")))
    precision, machine = run_provenance({"base": base, "train": train, "evaluate": {"eval_id": "e"}})
    assert precision == "base fp32 (base.mixed_precision=no on cpu); train bfloat16 (train.mixed_precision=bf16 on cpu)"
    assert machine["base"] == {"cpu": "Xeon"} and machine["train"] == {"cpu": "EPYC"}
    assert machine["evaluate"] is None and machine["report"]["cpu"]  # an evaluation cached from before facts were kept


OLD_RUNS = ('CREATE TABLE runs ("run_id" VARCHAR, "profile" VARCHAR, "eval_id" VARCHAR, "started_at" TIMESTAMP, '
            '"finished_at" TIMESTAMP, "status" VARCHAR, "report_path" VARCHAR, "config" JSON, PRIMARY KEY (run_id))')


def test_an_old_runs_table_gains_the_new_columns_and_keeps_its_rows(tmp_path):
    db = tmp_path / "results" / "pd.duckdb"
    db.parent.mkdir()
    with duckdb.connect(str(db)) as con:  # a state directory written before machine facts were kept
        con.execute(OLD_RUNS)
        con.execute("INSERT INTO runs VALUES ('old', 'smoke', 'e0', '2026-12-01 10:00', NULL, 'completed', 'r.md', '{}')")
    now = datetime.now(timezone.utc)
    write_run(db, RunRow("new", "demo", "e1", now - timedelta(minutes=19), now, "completed", "n.md", {"a": 1},
                         "train fp32 (train.mixed_precision=auto on cpu)", {"train": {"cpu": "AMD EPYC"}}))
    _, rows = query(db, "SELECT run_id, precision, machine->>'$.train.cpu', config->>'$.a' FROM runs ORDER BY run_id")
    assert rows == [("new", "train fp32 (train.mixed_precision=auto on cpu)", "AMD EPYC", "1"), ("old", None, None, None)]
    _, span = query(db, "SELECT date_diff('minute', started_at, finished_at) FROM runs WHERE run_id = 'new'")
    assert span == [(19,)]


def test_a_row_class_adds_only_the_columns_a_table_lacks():
    have = set(RunRow.columns()) - {"machine"}
    assert RunRow.added_columns_sql(have) == ['ALTER TABLE runs ADD COLUMN IF NOT EXISTS "machine" JSON']
    assert RunRow.added_columns_sql(set(RunRow.columns())) == []
    old_call = RunRow("r", "p", "e", None, None, "running", None, "{}")  # the new fields come last, with defaults
    assert (old_call.precision, old_call.machine) == (None, None)
