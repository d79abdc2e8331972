from __future__ import annotations

import hashlib
import re
import zipfile

import pytest

from tinylm.data import sources
from tinylm.data.sources import GPT2_VOCABULARY, SOURCES, RemoteFile, fetch, source_files
from tinylm.errors import TinylmError


def remote_for(content: bytes, name: str = "input.txt", **extra) -> RemoteFile:
    return RemoteFile(
        name, f"https://example.invalid/{name}", hashlib.sha256(content).hexdigest(), len(content), **extra
    )


def test_every_registry_file_names_its_url_size_and_sha256():
    remotes = [*GPT2_VOCABULARY]
    for dataset in SOURCES.values():
        remotes += [*dataset.files, *(r for subset in dataset.subsets.values() for r in subset)]
    # Alpaca's upstream publishes no checksum and could not be fetched where the registry was written.
    unpinned = [remote for remote in remotes if remote.sha256 is None]
    assert [remote.name for remote in unpinned] == ["alpaca_data.json"]
    for remote in remotes:
        assert remote.url.startswith("https://") and (remote in unpinned or remote.size > 0), remote.name
        assert remote in unpinned or re.fullmatch(r"[0-9a-f]{64}", remote.sha256), remote.name
        assert remote.split in (None, "train", "val", "test")
        if remote.archive is not None:
            assert remote.member.endswith(remote.name)


def test_every_mirrored_file_matches_the_registry(needs_mirror):
    checked = 0
    for dataset in SOURCES.values():
        for remote in [*dataset.files, *(r for subset in dataset.subsets.values() for r in subset)]:
            mirrored = sources.Path(sources.os.environ["TINYLM_DATASETS_MIRROR"]) / dataset.folder / remote.name
            if mirrored.is_file():
                assert mirrored.stat().st_size == remote.size, remote.name
                assert hashlib.sha256(mirrored.read_bytes()).hexdigest() == remote.sha256, remote.name
                checked += 1
    assert checked >= 6


def test_an_unknown_subset_lists_the_known_ones():
    with pytest.raises(TinylmError, match="dataset 'tinystories' has no subset 'head5'; its subsets: head10k"):
        source_files(SOURCES["tinystories"], "head5")


def test_a_mirrored_file_is_verified_and_cached(tmp_path, monkeypatch):
    remote = remote_for(b"to be or not to be\n")
    (tmp_path / "mirror" / "fake").mkdir(parents=True)
    (tmp_path / "mirror" / "fake" / "input.txt").write_bytes(b"to be or not to be\n")
    monkeypatch.setenv("TINYLM_DATASETS_MIRROR", str(tmp_path / "mirror"))
    path = fetch("fake", remote)
    assert path.parent == sources.cache_dir() / "datasets" / "fake" and path.read_bytes() == b"to be or not to be\n"
    (tmp_path / "mirror" / "fake" / "input.txt").unlink()
    assert fetch("fake", remote) == path  # served from the cache from now on


def test_a_file_that_fails_its_checksum_is_not_kept(tmp_path, monkeypatch):
    remote = remote_for(b"the real text\n")
    (tmp_path / "mirror" / "fake").mkdir(parents=True)
    (tmp_path / "mirror" / "fake" / "input.txt").write_bytes(b"a corrupted copy\n")
    monkeypatch.setenv("TINYLM_DATASETS_MIRROR", str(tmp_path / "mirror"))
    with pytest.raises(TinylmError, match="does not match the registry's sha256"):
        fetch("fake", remote)
    assert not list((sources.cache_dir() / "datasets" / "fake").iterdir())


def test_offline_without_cache_or_mirror_names_both_places(tmp_path, monkeypatch):
    monkeypatch.setenv("TINYLM_DATASETS_MIRROR", str(tmp_path / "empty-mirror"))
    with pytest.raises(TinylmError) as error:
        fetch("tinyshakespeare", SOURCES["tinyshakespeare"].files[0])
    message = str(error.value)
    assert str(sources.cache_dir() / "datasets" / "tinyshakespeare") in message
    assert str(tmp_path / "empty-mirror" / "tinyshakespeare") in message
    assert "TINYLM_OFFLINE" in message


class FakeResponse:
    """What urlopen returns: a status and the body in pieces."""

    def __init__(self, body: bytes, status: int = 200):
        self.status, self.rest = status, [body]

    def read(self, _size):
        return self.rest.pop() if self.rest else b""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_a_download_resumes_from_its_partial_file(tmp_path, monkeypatch):
    content = b"0123456789" * 100
    target = tmp_path / "input.txt"
    target.with_name("input.txt.part").write_bytes(content[:300])
    requested = {}

    def urlopen(request, timeout):
        requested["range"] = request.get_header("Range")
        return FakeResponse(content[300:], status=206)

    monkeypatch.setattr(sources.urllib.request, "urlopen", urlopen)
    assert sources.download(remote_for(content), target).read_bytes() == content
    assert requested["range"] == "bytes=300-"


def test_a_download_that_fails_its_checksum_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.delenv("TINYLM_OFFLINE")
    monkeypatch.setattr(sources.urllib.request, "urlopen", lambda request, timeout: FakeResponse(b"tampered"))
    with pytest.raises(TinylmError, match=r"https://example.invalid/input.txt does not match the registry's sha256"):
        fetch("fake", remote_for(b"genuine"))
    assert not list((sources.cache_dir() / "datasets" / "fake").iterdir())


def test_a_file_inside_a_zip_is_downloaded_with_it_and_verified(tmp_path, monkeypatch):
    monkeypatch.delenv("TINYLM_OFFLINE")
    members = {"corpus/wiki.train.raw": b" = A = \n text\n", "corpus/wiki.valid.raw": b" = B = \n more\n"}
    archive_path = tmp_path / "corpus.zip"
    with zipfile.ZipFile(archive_path, "w") as archive:
        for name, content in members.items():
            archive.writestr(name, content)
    archive_remote = remote_for(archive_path.read_bytes(), "corpus.zip")
    downloads = []

    def urlopen(request, timeout):
        downloads.append(request.full_url)
        return FakeResponse(archive_path.read_bytes())

    monkeypatch.setattr(sources.urllib.request, "urlopen", urlopen)
    for member, content in members.items():
        name = member.rpartition("/")[2]
        path = fetch("corpus", remote_for(content, name, archive=archive_remote, member=member))
        assert path.read_bytes() == content
    assert downloads == ["https://example.invalid/corpus.zip"]  # the archive once, then from the cache
    bad = remote_for(b"other", "wiki.test.raw", archive=archive_remote, member="corpus/wiki.train.raw")
    with pytest.raises(TinylmError, match=r"does not match the registry's sha256 for wiki\.test\.raw"):
        fetch("corpus", bad)
