"""``local_text``: a tfds dataset built from your own files, for tfds/seqio users of gist_jax.

Put text files (``.txt``, ``.py``, ``.md``, anything textual) and/or ``.jsonl`` files (one
document per line, field ``"text"``) in a directory, then::

    from gist_jax.data.local_text_builder import build_local_text
    spec = build_local_text("path/to/corpus", "path/to/tfds_data")   # -> "tfds:local_text:1.0.0@...#text"

and use ``spec`` as a data source (``DataConfig.sources``) or ``tfds.load("local_text",
data_dir=...)``. Train/validation are assigned per file by `gist_jax.data.sources.split_of` on
the path relative to the corpus directory, exactly like the ``files:`` source, and examples keep
the corpus order (shuffling disabled), so reading the dataset back is deterministic. A split with
no document is left out of the dataset (tfds cannot write an empty split); ``document_stream``
reads a missing split of ``local_text`` as empty.

One corpus per ``data_dir``: tfds identifies a prepared dataset by name and version only, so a
second corpus built into the same ``data_dir`` would silently reuse the first.
"""

from __future__ import annotations

import logging
import os
import pathlib
from collections.abc import Iterator
from typing import ClassVar

from gist_jax.utils import quiet_tf  # noqa: F401 - first: tensorflow without its C++ start-up lines on stderr

# isort: split

import tensorflow_datasets as tfds
from etils import epath

from gist_jax.data import sources
from gist_jax.data.vocabularies import hide_gpus_from_tensorflow
from gist_jax.utils import progress

hide_gpus_from_tensorflow()  # before tfds first touches tf devices

LOCAL_TEXT_VERSION = "1.0.0"
logger = logging.getLogger(__name__)


class LocalText(tfds.core.GeneratorBasedBuilder):
    """Documents ``{"doc_id", "text"}`` from the files of ``manual_dir``; splits train/validation by file."""

    VERSION = tfds.core.Version(LOCAL_TEXT_VERSION)
    RELEASE_NOTES: ClassVar[dict[str, str]] = {
        LOCAL_TEXT_VERSION: "Files of manual_dir; .jsonl one document per line (field 'text')."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Put your corpus in manual_dir: text files of any extension (one file = one document) and/or "
        ".jsonl files (one JSON object per line with a 'text' field). Subdirectories are walked; hidden "
        "files are skipped. Then call gist_jax.data.local_text_builder.build_local_text(manual_dir, data_dir)."
    )

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        """This file. tfds's own lookup needs the ``importlib_resources`` backport, absent from our pins."""
        return epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Local text corpus for gist_jax (see gist_jax/data/local_text_builder.py).",
            features=tfds.features.FeaturesDict({"doc_id": tfds.features.Text(), "text": tfds.features.Text()}),
            disable_shuffling=True,  # keep corpus order: reading back is deterministic and matches files:
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Iterator]:
        """One generator per split that has a document: tfds refuses to write an empty split."""
        files = sources.match_files([str(dl_manager.manual_dir)])
        return {split: self._generate_examples(files, split) for split in sources.SPLITS
                if next(_documents(files, split), None) is not None}

    def _generate_examples(self, files: list[sources.SourceFile], split: str) -> Iterator[tuple[str, dict]]:
        for doc_id, text in _documents(files, split):
            yield doc_id, {"doc_id": doc_id, "text": text}


def _documents(files: list[sources.SourceFile], split: str) -> Iterator[sources.Document]:
    """Documents of ``split``, ids relative to manual_dir (so they do not depend on where it lives)."""
    for file in files:
        if sources.split_of(file.name) == split:
            yield from sources.read_documents(sources.SourceFile(file.path, file.name, file.name))


def local_text_spec(data_dir: str | os.PathLike, field: str = "text") -> str:
    """The source spec that reads a ``local_text`` dataset prepared in ``data_dir``."""
    return f"tfds:local_text:{LOCAL_TEXT_VERSION}@{os.fspath(data_dir)}#{field}"


def build_local_text(manual_dir: str | os.PathLike, data_dir: str | os.PathLike) -> str:
    """Prepare ``local_text`` from the files in ``manual_dir`` into ``data_dir``; returns its source spec.

    Offline: nothing is downloaded (tfds's download directory is kept inside ``data_dir``). A
    dataset already prepared in ``data_dir`` is left as is.
    """
    manual_dir, data_dir = pathlib.Path(manual_dir), pathlib.Path(data_dir)
    if not manual_dir.is_dir():
        raise FileNotFoundError(f"local_text manual_dir {str(manual_dir)!r} is not a directory")
    builder = LocalText(data_dir=str(data_dir))
    if not builder.is_prepared():
        logger.info("preparing tfds local_text from %s into %s", manual_dir, data_dir)
    tfds.display_progress_bar(progress.enabled())  # tfds's own bars ("Generating splits"), under our policy
    builder.download_and_prepare(
        download_dir=str(data_dir / "downloads"),
        download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)),
    )
    return local_text_spec(data_dir)
