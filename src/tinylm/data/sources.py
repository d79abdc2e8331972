"""Where raw text comes from: a registry of public datasets, and the user's own files.

Every registry file resolves in this order:
1. the cache, `$TINYLM_CACHE/datasets/<folder>/<file>` (default ~/.cache/tinylm);
2. the offline mirror, `$TINYLM_DATASETS_MIRROR/<folder>/<file>` (same names as upstream; copied into the cache);
3. the network: a resumable download, checked against the registry's sha256 before it lands in the cache.
`TINYLM_OFFLINE=1` skips the network.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from tinylm.errors import TinylmError


@dataclass(frozen=True)
class RemoteFile:
    name: str
    """File name, the same upstream, in the mirror and in the cache."""
    url: str
    sha256: str
    size: int


@dataclass(frozen=True)
class DatasetSource:
    name: str
    folder: str
    """Folder of this dataset in the cache and in the mirror."""
    description: str
    files: tuple[RemoteFile, ...]


SOURCES: dict[str, DatasetSource] = {
    source.name: source
    for source in [
        DatasetSource(
            name="tinyshakespeare",
            folder="tinyshakespeare",
            description="Tiny Shakespeare (char-rnn): 40k lines of plays, 1.1 MB",
            files=(
                RemoteFile(
                    name="input.txt",
                    url="https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
                    sha256="86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
                    size=1115394,
                ),
            ),
        ),
    ]
}


def cache_dir() -> Path:
    return Path(os.environ.get("TINYLM_CACHE") or Path.home() / ".cache" / "tinylm")


def read_source_text(source: str) -> tuple[str, str]:
    """The whole text of a dataset name or a .txt path, and a name for it (used to name its prepared data)."""
    if source in SOURCES:
        dataset = SOURCES[source]
        paths = [fetch(dataset, remote) for remote in dataset.files]
        return "".join(read_text_file(p) for p in paths), dataset.name
    path = Path(source).expanduser()
    if path.suffix != ".txt" and not path.exists():
        raise TinylmError(f"unknown dataset '{source}'; choose one of: {', '.join(SOURCES)}, or give a .txt file path")
    return read_text_file(path), path.stem


def read_text_file(path: Path) -> str:
    if not path.is_file():
        raise TinylmError(f"data file not found: {path}")
    raw = path.read_bytes()
    if not raw.strip():
        raise TinylmError(f"data file is empty: {path}; give a file with text in it")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise TinylmError(f"{path} is not UTF-8 text (bad byte at offset {error.start}); convert it to UTF-8") from None


def fetch(dataset: DatasetSource, remote: RemoteFile) -> Path:
    """The local path of one registry file: cached, copied from the mirror, or downloaded, and always verified."""
    cached = cache_dir() / "datasets" / dataset.folder / remote.name
    if cached.is_file():
        return cached
    cached.parent.mkdir(parents=True, exist_ok=True)
    mirror_root = os.environ.get("TINYLM_DATASETS_MIRROR")
    mirrored = Path(mirror_root) / dataset.folder / remote.name if mirror_root else None
    if mirrored is not None and mirrored.is_file():
        partial = cached.with_name(cached.name + ".part")
        shutil.copyfile(mirrored, partial)
        return _verified_into_place(partial, cached, remote, origin=str(mirrored))
    if os.environ.get("TINYLM_OFFLINE"):
        reason = "TINYLM_OFFLINE is set"
    else:
        try:
            return download(remote, cached)
        except (urllib.error.URLError, OSError) as error:
            reason = f"downloading {remote.url} failed ({getattr(error, 'reason', error)})"
    mirror_text = f"the mirror ({mirrored.parent})" if mirrored else "the mirror (TINYLM_DATASETS_MIRROR is not set)"
    raise TinylmError(
        f"{dataset.folder}/{remote.name} is neither in the cache ({cached.parent}) nor in {mirror_text}, and {reason}; "
        f"put {remote.name} in either folder or go online"
    )


def download(remote: RemoteFile, target: Path) -> Path:
    """Download to `<target>.part`, resuming a previous partial download, then verify and move into place."""
    partial = target.with_name(target.name + ".part")
    have = partial.stat().st_size if partial.exists() else 0
    request = urllib.request.Request(remote.url, headers={"Range": f"bytes={have}-"} if have else {})
    with urllib.request.urlopen(request, timeout=30) as response:
        resumed = response.status == 206
        mode = "ab" if resumed else "wb"
        with (
            open(partial, mode) as out,
            tqdm(total=remote.size, initial=have if resumed else 0, unit="B", unit_scale=True, desc=remote.name) as bar,
        ):
            while chunk := response.read(1 << 20):
                out.write(chunk)
                bar.update(len(chunk))
    return _verified_into_place(partial, target, remote, origin=remote.url)


def _verified_into_place(partial: Path, target: Path, remote: RemoteFile, origin: str) -> Path:
    digest = hashlib.sha256()
    with open(partial, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    if digest.hexdigest() != remote.sha256:
        partial.unlink()
        raise TinylmError(
            f"{origin} does not match the registry's sha256 for {remote.name} (got {digest.hexdigest()[:12]}…, "
            f"expected {remote.sha256[:12]}…); delete the bad copy and fetch it again"
        )
    os.replace(partial, target)
    return target
