from lt_jax import storage


def test_gcs_round_trip(gcs_bucket, tmp_path):
    path = storage.join(gcs_bucket, "dir", "a.txt")
    storage.write_text(path, "héllo")
    assert storage.read_text(path) == "héllo"
    assert storage.exists(path)
    assert storage.listdir(storage.join(gcs_bucket, "dir")) == ["a.txt"]
    local = tmp_path / "up"
    local.mkdir()
    (local / "b.bin").write_bytes(b"\x00\x01")
    storage.copy_local_to(str(local), storage.join(gcs_bucket, "up"))
    assert storage.read_bytes(storage.join(gcs_bucket, "up", "b.bin")) == b"\x00\x01"
    down = storage.download_dir(storage.join(gcs_bucket, "up"), str(tmp_path / "down"))
    assert open(f"{down}/b.bin", "rb").read() == b"\x00\x01"


def test_local_round_trip(tmp_path):
    path = str(tmp_path / "x" / "y.txt")
    storage.write_text(path, "ok")
    assert storage.read_text(path) == "ok"
    assert storage.listdir(str(tmp_path / "x")) == ["y.txt"]


def _closed_port() -> int:
    import socket

    with socket.socket() as s:  # bound then closed: nothing listens there
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_gcs_is_one_line_within_seconds(tmp_path):
    """A dead endpoint (no network, a wrong emulator address) is one error line naming the path, not
    minutes of client retries ending in a traceback."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{_closed_port()}", "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
    path = "gs://no-such-bucket/graded.jsonl"
    for argv in (["grade", "--in", path, "--out", str(tmp_path / "g.jsonl"), "--no-progress"],
                 ["tokenize", "--in", path, "--tokenizer", str(tmp_path), "--out", str(tmp_path / "t"), "--no-progress"]):
        # the timeout is the test: before the fix each command retried for a minute or more
        res = subprocess.run([sys.executable, "-m", "lt_jax.cli", *argv], capture_output=True, text=True, env=env, timeout=45)
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2 and len(lines) == 1, res.stderr[-2000:]
        assert path in lines[0] and "cannot reach" in lines[0] and "Traceback" not in res.stderr
    assert not (tmp_path / "g.jsonl").exists()
