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
