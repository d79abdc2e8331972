"""Where raw files come from: a registry of public datasets (and of GPT-2's vocabulary files), with their sha256.

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
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path

from tqdm.auto import tqdm  # widgets in notebooks, text bars elsewhere

from tinylm.errors import TinylmError


@dataclass(frozen=True)
class RemoteFile:
    name: str
    """File name, the same upstream, in the mirror and in the cache."""
    url: str
    sha256: str | None
    """None only where the upstream publishes no checksum and none could be recorded: the file is then not verified."""
    size: int | None
    split: str | None = None
    """The split this file is (train, val or test); None: its documents are split by data.val_fraction."""
    archive: RemoteFile | None = None
    """The zip this file comes in upstream: downloading fetches the archive and extracts `member` from it."""
    member: str = ""


@dataclass(frozen=True)
class DatasetSource:
    name: str
    folder: str
    """Folder of this dataset in the cache and in the mirror."""
    description: str
    files: tuple[RemoteFile, ...]
    subsets: dict[str, tuple[RemoteFile, ...]] = field(default_factory=dict)
    """Named parts of the dataset, asked for with data.subset: e.g. the first lines that the offline mirror holds."""
    instructions: bool = False
    """An instruction set (Alpaca-form examples) for `tinylm finetune --data`, rather than text to pretrain on."""
    restore_final_answers: bool = False
    """An instruction set whose responses lost GSM8K's closing `#### N` line: it is put back (`with_final_answer`)."""


GITHUB = "https://raw.githubusercontent.com"
HF_TINYSTORIES = "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main"

# Sizes and sha256 are the Git LFS records of the Hugging Face dataset repository roneneldan/TinyStories.
TINYSTORIES_V2_FILES = (
    RemoteFile(
        name="TinyStoriesV2-GPT4-train.txt",
        url=f"{HF_TINYSTORIES}/TinyStoriesV2-GPT4-train.txt",
        sha256="6418d412de72888f52b5142c761ac21a582f7d1166f0bfbdb5f03ccfdec90443",
        size=2227753162,
        split="train",
    ),
    RemoteFile(
        name="TinyStoriesV2-GPT4-valid.txt",
        url=f"{HF_TINYSTORIES}/TinyStoriesV2-GPT4-valid.txt",
        sha256="6874bae9a4c1a4e7edcf0e53b86c17817e9cf881fc75ff2368da457b80c0585d",
        size=22502601,
        split="val",
    ),
)
TINYSTORIES_V1_FILES = (
    RemoteFile(
        name="TinyStories-train.txt",
        url=f"{HF_TINYSTORIES}/TinyStories-train.txt",
        sha256="c5cf5e22ff13614e830afbe61a99fbcbe8bcb7dd72252b989fa1117a368d401f",
        size=1924281556,
        split="train",
    ),
    RemoteFile(
        name="TinyStories-valid.txt",
        url=f"{HF_TINYSTORIES}/TinyStories-valid.txt",
        sha256="94e431816c4cce81ff71e4408ff8d3bda9a42e8d2663986697c3954288cb38b4",
        size=19447282,
        split="val",
    ),
)
# The 44 story beginnings the TinyStories paper (Eldan and Li, 2023) asks a model to complete for its quality
# evaluation, published beside the dataset; the file name has a space, escaped in the URL.
TINYSTORIES_EVALUATION_PROMPTS = RemoteFile(
    name="Evaluation prompts.yaml",
    url=f"{HF_TINYSTORIES}/Evaluation%20prompts.yaml",
    sha256="a915216be5516348af9db387c5bb51e8e930e7997eb0543a3de0bf63c7fe81ee",
    size=11759,
)
TINYSTORIES_FOLDER = "tinystories"
# WikiText-2 ships as one zip (its sha256 is recorded by Hugging Face datasets' wikitext script); each split file is
# extracted from it and checked on its own.
WIKITEXT2_ZIP = RemoteFile(
    name="wikitext-2-raw-v1.zip",
    url="https://wikitext.smerity.com/wikitext-2-raw-v1.zip",
    sha256="ef7edb566e3e2b2d31b29c1fdb0c89a4cc683597484c3dc2517919c615435a11",
    size=4721645,
)
WIKITEXT2_TRAIN, WIKITEXT2_VALID, WIKITEXT2_TEST = (
    RemoteFile(
        name=name,
        url=WIKITEXT2_ZIP.url,
        sha256=sha256,
        size=size,
        split=split,
        archive=WIKITEXT2_ZIP,
        member=f"wikitext-2-raw/{name}",
    )
    for name, sha256, size, split in (
        ("wiki.train.raw", "6707892fa3788b5ab9ed78ab5ff37d9fe825f6011a2ad4fcd6a6d467f0e7da57", 10940747, "train"),
        ("wiki.valid.raw", "4cd0f6876d07a413aa911261ff6d363c72d757d47f0fdd6015702014c89cb9c7", 1146846, "val"),
        ("wiki.test.raw", "173c87a53759e0201f33e0ccf978e510c2042d7f2cb78229d9a50d79b9e7dd08", 1290590, "test"),
    )
)
WIKITEXT2_FILES = (WIKITEXT2_TRAIN, WIKITEXT2_VALID, WIKITEXT2_TEST)

SOURCES: dict[str, DatasetSource] = {
    source.name: source
    for source in [
        DatasetSource(
            name="tinyshakespeare",
            folder="tinyshakespeare",
            description="Tiny Shakespeare (char-rnn): 40k lines of plays, 1.1 MB, one document",
            files=(
                RemoteFile(
                    name="input.txt",
                    url=f"{GITHUB}/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
                    sha256="86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
                    size=1115394,
                ),
            ),
        ),
        DatasetSource(
            name="tinystories",
            folder=TINYSTORIES_FOLDER,
            description="TinyStories V2 (stories written by GPT-4 only): 2.7M stories, 2.2 GB train, 22 MB valid",
            files=TINYSTORIES_V2_FILES,
            subsets={
                # The first 10,000 lines of the train file (1727 whole stories, the last one cut), kept by a GitHub
                # project: what the offline mirror holds, for tests and CPU demos. Validation is held out of it.
                "head10k": (
                    RemoteFile(
                        name="TinyStoriesV2-GPT4-train.head10k.txt",
                        url=f"{GITHUB}/mines-opt-ml/decoding-gpt/b7753c9b80f5b19105f2f4833c135adebf62276b"
                        "/data/tinystories_10k.txt",
                        sha256="5a19b936d7b53bbdac1eea03230b00161dceca24ae272f5bd8e9dbbc2a883418",
                        size=1424708,
                    ),
                ),
            },
        ),
        DatasetSource(
            name="tinystories-v1",
            folder=TINYSTORIES_FOLDER,
            description="TinyStories, the original release (GPT-3.5 and GPT-4 stories): 2.1M stories, 1.9 GB train",
            files=TINYSTORIES_V1_FILES,
            subsets={
                # The first 1000 stories of the validation file, kept by a GitHub project; split by val_fraction.
                "valid-head1000": (
                    RemoteFile(
                        name="TinyStories-valid.head1000.txt",
                        url=f"{GITHUB}/BhargavKumarNath/NanoGPT/25e02c8a/data_corpus/tinystories_val.txt",
                        sha256="c86f734a3a07fffb8a52f4a7970ac7dbeaf4eaf6a031dc8742a8de92fbbb9446",
                        size=807375,
                    ),
                ),
                # The first 1000 stories of the train file as a JSON list, kept by a GitHub project.
                "train-first1000": (
                    RemoteFile(
                        name="TinyStories-train.first1000.json",
                        url=f"{GITHUB}/ToonTalk/jlens-tinystories/8c6e947e/out/corpora/tinystories_1000.json",
                        sha256="81eb9eb450a4a0509f719ba60bb1c4cd043d91156b303fdc3c13627639079935",
                        size=970554,
                    ),
                ),
            },
        ),
        DatasetSource(
            name="wikitext2",
            folder="wikitext-2-raw",
            description="WikiText-2 raw: 720 Wikipedia articles, 11 MB train, with the standard valid and test splits",
            files=WIKITEXT2_FILES,
            subsets={
                # The official validation or test file alone (what the offline mirror holds), split by val_fraction.
                "valid": (replace(WIKITEXT2_VALID, split=None),),
                "test": (replace(WIKITEXT2_TEST, split=None),),
            },
        ),
        DatasetSource(
            name="gsm8k",
            folder="gsm8k",
            description="GSM8K train in Alpaca form: 7473 grade-school math problems with worked answers, 4.2 MB",
            files=(
                RemoteFile(
                    name="gsm_8k_train.alpaca.json",
                    url=f"{GITHUB}/gururise/AlpacaDataCleaned/791174f6/dataset_extensions/gsm_8k/gsm_8k_train.json",
                    sha256="9c9ffe9b3d4c4872bad982075feed550e5e1b2fc293ad9ed1a29b373ae920f99",
                    size=4178931,
                ),
            ),
            instructions=True,
            restore_final_answers=True,
        ),
        DatasetSource(
            name="alpaca",
            folder="alpaca",
            description="Stanford Alpaca: 52k instructions with answers by text-davinci-003, 22 MB",
            files=(
                # Upstream publishes no checksum and the file could not be fetched where this registry was written.
                RemoteFile(
                    name="alpaca_data.json",
                    url=f"{GITHUB}/tatsu-lab/stanford_alpaca/main/alpaca_data.json",
                    sha256=None,
                    size=None,
                ),
            ),
            instructions=True,
        ),
    ]
}
GPT2_VOCABULARY_FOLDER = "gpt2"
GPT2_VOCABULARY = (
    RemoteFile(
        name="vocab.bpe",
        url="https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
        sha256="1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
        size=456318,
    ),
    RemoteFile(
        name="encoder.json",
        url="https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
        sha256="196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
        size=1042301,
    ),
)


def cache_dir() -> Path:
    return Path(os.environ.get("TINYLM_CACHE") or Path.home() / ".cache" / "tinylm")


def source_files(dataset: DatasetSource, subset: str | None) -> tuple[RemoteFile, ...]:
    if subset is None:
        return dataset.files
    if subset not in dataset.subsets:
        choices = ", ".join(dataset.subsets) or "none"
        raise TinylmError(f"dataset '{dataset.name}' has no subset '{subset}'; its subsets: {choices}")
    return dataset.subsets[subset]


def fetch(folder: str, remote: RemoteFile) -> Path:
    """The local path of one registry file: cached, copied from the mirror, or downloaded, and always verified."""
    cached = cache_dir() / "datasets" / folder / remote.name
    if cached.is_file():
        return cached
    cached.parent.mkdir(parents=True, exist_ok=True)
    mirror_root = os.environ.get("TINYLM_DATASETS_MIRROR")
    mirrored = Path(mirror_root) / folder / remote.name if mirror_root else None
    if mirrored is not None and mirrored.is_file():
        partial = cached.with_name(cached.name + ".part")
        shutil.copyfile(mirrored, partial)
        return _verified_into_place(partial, cached, remote, origin=str(mirrored))
    if os.environ.get("TINYLM_OFFLINE"):
        reason = "TINYLM_OFFLINE is set"
    else:
        try:
            if remote.archive is not None:
                return extract(fetch(folder, remote.archive), remote, cached)
            return download(remote, cached)
        except (urllib.error.URLError, OSError) as error:
            reason = f"downloading {remote.url} failed ({getattr(error, 'reason', error)})"
    mirror_text = f"the mirror ({mirrored.parent})" if mirrored else "the mirror (TINYLM_DATASETS_MIRROR is not set)"
    raise TinylmError(
        f"{folder}/{remote.name} is neither in the cache ({cached.parent}) nor in {mirror_text}, and {reason}; "
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
            tqdm(
                total=remote.size,
                initial=have if resumed else 0,
                unit="B",
                unit_scale=True,
                desc=remote.name,
                disable=None,
            ) as bar,
        ):
            while chunk := response.read(1 << 20):
                out.write(chunk)
                bar.update(len(chunk))
    return _verified_into_place(partial, target, remote, origin=remote.url)


def extract(archive: Path, remote: RemoteFile, target: Path) -> Path:
    partial = target.with_name(target.name + ".part")
    with zipfile.ZipFile(archive) as zipped, zipped.open(remote.member) as member, open(partial, "wb") as out:
        shutil.copyfileobj(member, out)
    return _verified_into_place(partial, target, remote, origin=f"{archive}:{remote.member}")


def _verified_into_place(partial: Path, target: Path, remote: RemoteFile, origin: str) -> Path:
    if remote.sha256 is None:
        os.replace(partial, target)
        return target
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
