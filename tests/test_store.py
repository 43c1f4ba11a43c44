"""The results store under failure: writes are all or nothing (local and S3), credentials in a
store URI are never shown, and a store that refuses writes (a full disk) stops a sweep with a
message instead of failing trial after trial as if workers died."""

import os
import shutil
import subprocess
import sys
import textwrap

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raymeta.errors import StorageError, is_storage_failure
from raymeta.results import query, store
from raymeta.results.store import display_store, filesystem, redact, write_rows

ROWS = [{"trial_id": "t1", "status": "completed", "final_test_acc": 0.5 + i / 1000,
         "config_json": "x" * 200} for i in range(50)]


def _half_written_then_raise(monkeypatch):
    """pq.write_table that writes the first half of the real file to its sink, then fails:
    an error in the middle of serialising a Parquet file."""
    real = pq.write_table

    def broken(table, where, **kwargs):
        whole = pa.BufferOutputStream()
        real(table, whole, **kwargs)
        data = whole.getvalue()
        if isinstance(where, str):
            with open(where, "wb") as out:
                out.write(data[: len(data) // 2])
        else:
            where.write(data[: len(data) // 2])
        raise RuntimeError("failed in the middle of writing")

    monkeypatch.setattr(pq, "write_table", broken)


@pytest.mark.parametrize("kind", ["s3", "local"])
def test_a_failed_write_leaves_the_previous_file_intact(kind, tmp_path, monkeypatch, request):
    where = request.getfixturevalue("s3_server") if kind == "s3" else str(tmp_path / "store")
    path = write_rows(where, "trials", "sw", "t1", ROWS)
    fs, _ = filesystem(where)
    before = fs.get_file_info(path).size
    _half_written_then_raise(monkeypatch)
    with pytest.raises(RuntimeError, match="middle of writing"):
        write_rows(where, "trials", "sw", "t1", [{**ROWS[0], "status": "failed"}])
    monkeypatch.undo()
    assert fs.get_file_info(path).size == before  # not a partial file in its place
    assert pq.read_table(path, filesystem=fs).to_pylist() == ROWS
    assert len(query.load(where, "trials", "sw")) == len(ROWS)
    if kind == "local":  # and no temporary file left behind (on a full disk it holds space)
        assert not list((tmp_path / "store" / "trials" / ".tmp").iterdir())


def test_checkpoint_upload_is_one_whole_object(s3_server, tmp_path):
    from raymeta.orchestrate.sweep import TrialCheckpoint

    checkpoint = TrialCheckpoint(s3_server, "sw", "t1")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    assert checkpoint.folder(str(scratch)) == str(scratch)
    import torch

    torch.save({"epoch": 3, "curves": [{"epoch": 0}]}, scratch / "checkpoint.pt")
    checkpoint.push()
    assert checkpoint.state()["epoch"] == 3
    assert checkpoint.fs.get_file_info(checkpoint.file).size == (scratch / "checkpoint.pt").stat().st_size


def test_a_curve_metric_that_starts_after_the_first_epoch_is_kept(tmp_path):
    # MetaLabelNet reports its soft labels' agreement only after its warm-up, MLC its T only
    # once it learns one: the stored curves must keep them, not the first epoch's columns only
    curves = [{"epoch": 0, "test_acc": 0.5},
              {"epoch": 1, "test_acc": 0.6, "train_soft_agrees_true": 0.9, "T": [1.0, 0.0]},
              {"epoch": 2, "test_acc": 0.7, "train_soft_agrees_true": 0.95, "T": [0.9, 0.1]}]
    store.write_trial(str(tmp_path), "sw", "t1", {"status": "completed"}, curves)
    read = query.curves(str(tmp_path), sweep="sw", metrics=("train_soft_agrees_true", "T"))
    assert read["train_soft_agrees_true"].to_list() == [None, 0.9, 0.95]
    assert read["T"].to_list() == [None, [1.0, 0.0], [0.9, 0.1]]


def test_a_full_disk_is_a_storage_error_naming_the_store(tmp_path):
    assert is_storage_failure(OSError(28, "No space left on device"))
    assert is_storage_failure(OSError("Error writing bytes to file. Detail: [errno 122] Disk quota"))
    assert is_storage_failure(OSError("AWS Error ACCESS_DENIED during PutObject operation"))
    assert not is_storage_failure(OSError(2, "No such file or directory"))
    assert not is_storage_failure(ValueError("no space left on device"))
    failure = store.storage_error(OSError(28, "No space left on device"),
                                  "s3://KEY:SECRET@bucket/p", "the trials of trial t1")
    assert isinstance(failure, StorageError)
    assert str(failure) == ("cannot write the trials of trial t1 to the results store "
                            "s3://bucket/p: [Errno 28] No space left on device")
    import pickle

    again = pickle.loads(pickle.dumps(StorageError("m", "s3://b", (("sw", "t1", "why"),))))
    assert (str(again), again.store, again.unwritten) == ("m", "s3://b", (("sw", "t1", "why"),))


@pytest.mark.parametrize("uri,shown", [
    ("s3://AKIAEXAMPLE:wJalr%2FSECRET@bucket/path", "s3://bucket/path"),
    ("s3://AKIAEXAMPLE:wJalrSECRET@bucket/path?endpoint_override=h:9000&scheme=http",
     "s3://bucket/path?endpoint_override=h:9000&scheme=http"),
    ("s3://bucket/p?access_key=AKIAEXAMPLE&secret_key=wJalrSECRET&session_token=TOK123&region=x",
     "s3://bucket/p?access_key=***&secret_key=***&session_token=***&region=x"),
    ("gs://bucket/p?access_token=ya29SECRET", "gs://bucket/p?access_token=***"),
    ("s3://bucket/path", "s3://bucket/path"),
    ("/data/results", "/data/results"),
])
def test_display_store_hides_credentials(uri, shown):
    assert display_store(uri) == shown
    assert display_store(display_store(uri)) == shown
    message = redact(f"Cannot parse URI: '{uri}' (key AKIAEXAMPLE)", uri)
    for secret in ("wJalr", "TOK123", "ya29SECRET", "AKIAEXAMPLE"):
        assert secret not in message or secret not in uri


def _cli(*args, cwd, env=None):
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.run([sys.executable, "-m", "raymeta.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_credentials_in_a_store_uri_are_never_printed(s3_server, tmp_path):
    location, query_text = s3_server.split("?", 1)
    secret = "S3cretValue0xDEADBEEF"
    with_userinfo = location.replace("s3://", f"s3://testing:{secret}@") + "?" + query_text
    for uri in (with_userinfo,):  # pyarrow's S3 URIs take credentials as user-info only
        shown = display_store(uri)
        (tmp_path / "sweep.yaml").write_text(textwrap.dedent(f"""
            name: creds
            store: "{uri}"
            base: {{dataset: {{name: digits}}, train: {{epochs: 1}}}}
            grid: {{seed: [0]}}
            """))
        printed = []
        dry = _cli("sweep", "sweep.yaml", "--dry-run", cwd=tmp_path)
        assert dry.returncode == 0 and f"-> {shown}" in dry.stdout, dry.stdout + dry.stderr
        missing = _cli("results", "summary", "--sweep", "nope", "--store", uri, cwd=tmp_path)
        assert missing.returncode == 2 and f"in store {shown}" in missing.stderr, missing.stderr
        # a bucket that does not exist: the preflight's error names the store
        bad = uri.replace("s3://testing:" + secret + "@sweeps/", "s3://testing:" + secret + "@nobucket/")
        bad = bad.replace("s3://sweeps/", "s3://nobucket/")
        (tmp_path / "bad.yaml").write_text((tmp_path / "sweep.yaml").read_text().replace(uri, bad))
        refused = _cli("validate", "bad.yaml", cwd=tmp_path)
        assert refused.returncode == 2 and f"results store {display_store(bad)} cannot be " \
            f"written" in refused.stderr, refused.stderr
        for proc in (dry, missing, refused):
            printed.append(proc.stdout + proc.stderr)
        assert all(secret not in text for text in printed), printed


SWEEP = """
name: full
store: store
base:
  dataset: {name: digits}
  model: {name: mlp, options: {hidden: [32]}}
  train: {epochs: 2, batch_size: 128}
  meta_set: {per_class: 5}
grid:
  seed: [0, 1, 2]
resources: {max_concurrent_trials: 1}
"""


def _refusing_store(store, tune) -> tuple[list[str], str]:
    """A command prefix under which `store` refuses writes, and the error it gives. With
    `unshare` (a user and mount namespace of the command's own; root is not needed): the
    store is an 8 KiB tmpfs, a real full disk (ENOSPC) once the preflight's probe is gone.
    Else, for a user who is not root: the store's folders read-only (EACCES). Either way the
    store's `tune/` folder (Tune's own state) is a link to a normal folder, so that what fails
    is raymeta's writes, the same on every run."""
    store.mkdir()
    tune.mkdir()
    if shutil.which("unshare") and subprocess.run(["unshare", "-rm", "true"],
                                                  capture_output=True).returncode == 0:
        script = 'mount -t tmpfs -o size=8k tmpfs "$1" && ln -s "$2" "$1/tune" && shift 2 && exec "$@"'
        return ["unshare", "-rm", "sh", "-c", script, "sh", str(store), str(tune)], \
            "No space left on device"
    if os.geteuid() != 0:
        (store / "tune").symlink_to(tune)
        for name in ("checkpoints", "trials", "curves"):
            (store / name).mkdir(mode=0o555)
        return [], "Permission denied"
    pytest.skip("no way to make a store refuse writes here (root without unshare)")


def _sweep_on_a_refusing_store(tmp_path, sweep: str) -> tuple[subprocess.CompletedProcess, str]:
    """`raymeta sweep` of this sweep file's text, its store `store` refusing writes
    (`_refusing_store`); the finished process and the error the store gives."""
    (tmp_path / "sweep.yaml").write_text(sweep)
    prefix, reason = _refusing_store(tmp_path / "store", tmp_path / "tune")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONWARNINGS": "ignore",
           "RAYMETA_STATE_DIR": str(tmp_path / "state")}
    proc = subprocess.run([*prefix, sys.executable, "-m", "raymeta.cli", "sweep", "sweep.yaml"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    return proc, reason


@pytest.mark.ray
def test_a_store_that_refuses_writes_stops_the_sweep(tmp_path):
    """The first trial's checkpoint write fails (disk full): the trial ends at once as a
    storage failure, not retried, no further trial starts, its failed row cannot be written
    either; the driver says so naming the store and the error, lists the trial, exits 1, and
    the next run's preflight reports the trial again."""
    proc, reason = _sweep_on_a_refusing_store(tmp_path, SWEEP)
    out, err = proc.stdout, proc.stderr
    assert proc.returncode == 1, out + err
    store_path = str(tmp_path / "store")
    assert f"the results store {store_path} refuses writes" in err and reason in err, err
    assert "aborted" not in err and "interrupted" not in err
    assert "0 of 3 trials ran" not in err and "2 not started" in err, err
    first = "ce_digits_clean_s0_40e3d66a79"
    listed = f"trial {first} failed and its row could not be written to {store_path}: StorageError"
    assert listed in err and f"cannot write the checkpoint {store_path}/checkpoints" in err, err
    # one trial ran, once: the other two never started
    assert out.count("FAILED") == 1 and "[1/3 done, 0 running, 1 failed" in out, out
    assert "ce_digits_clean_s1_" not in out + err and "ce_digits_clean_s2_" not in out + err
    # the local record, reported by the next run's preflight (here: raymeta validate)
    record = (tmp_path / "state" / "unwritten-rows.jsonl").read_text()
    assert first in record and store_path in record
    later = _cli("validate", "sweep.yaml", cwd=tmp_path, env={"RAYMETA_STATE_DIR": str(tmp_path / "state")})
    assert f"note: trial {first} (sweep 'full') failed and its row could not be written to " \
           f"{store_path}: StorageError" in later.stderr, later.stdout + later.stderr
    listing = _cli("results", "failed", "--store", "store", cwd=tmp_path,
                   env={"RAYMETA_STATE_DIR": str(tmp_path / "state")})
    assert f"full/{first}: failed, its row not written to the store: StorageError" in listing.stdout


@pytest.mark.ray
def test_a_store_that_refuses_rows_stops_a_chain_of_cells(tmp_path):
    """Chained cells (resources.cells_per_trial), no checkpoints, write their rows on a thread
    while the next cell trains: when the store refuses the first cell's rows, the chain stops
    before a further cell starts; the driver names the store and the cells whose rows were
    refused, and counts the cells that never trained as not started."""
    chained = (SWEEP.replace("train: {epochs: 2, batch_size: 128}",
                             "train: {epochs: 2, batch_size: 128, checkpoint: false}")
               .replace("seed: [0, 1, 2]", "seed: [0, 1, 2, 3, 4, 5]")
               .replace("resources: {max_concurrent_trials: 1}",
                        "resources: {max_concurrent_trials: 1, cells_per_trial: 6}"))
    proc, reason = _sweep_on_a_refusing_store(tmp_path, chained)
    out, err = proc.stdout, proc.stderr
    assert proc.returncode == 1, out + err
    store_path = str(tmp_path / "store")
    assert f"the results store {store_path} refuses writes" in err and reason in err, err
    listed = [line.split()[1] for line in err.splitlines()
              if line.startswith("trial ") and "its row could not be written" in line]
    # the second cell may have trained while the first one's rows were being refused
    assert listed[:1] == ["ce_digits_clean_s0_39bc6b8722"] and len(listed) <= 2, err
    assert f"{len(listed)} of 6 trials ran (0 completed, {len(listed)} failed), " \
           f"{6 - len(listed)} not started" in err, err
    record = (tmp_path / "state" / "unwritten-rows.jsonl").read_text()
    assert all(trial_id in record for trial_id in listed)
