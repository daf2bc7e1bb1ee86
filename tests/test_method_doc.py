"""docs/method.md, the method as the code implements it: every config key it names exists, and
nothing in the repository cites a method file outside it."""

from __future__ import annotations

import pathlib
import re

from gist_jax.train.experiment import default_config

REPO = pathlib.Path(__file__).resolve().parents[1]
METHOD = REPO / "docs" / "method.md"
SECTIONS = "compression|objective|optimizer|model|data|step|train|checkpoint|mesh"
OUTSIDE = "shared/" + "docs/method.md"  # split so this file does not cite it


def test_every_key_in_the_method_doc_exists():
    config = default_config()
    keys = set(re.findall(rf"`((?:{SECTIONS})\.[a-z_0-9]+)", METHOD.read_text()))
    assert len(keys) > 30
    missing = sorted(k for k in keys if k.split(".")[1] not in config[k.split(".")[0]])
    assert not missing, f"docs/method.md names keys that default_config() lacks: {missing}"


def test_sections_cited_by_the_code_exist():
    headings = set(re.findall(r"^#{2,3} (\d+(?:\.\d+)?)\.? ", METHOD.read_text(), flags=re.MULTILINE))
    cited = set()
    for path in [*REPO.glob("gist_jax/**/*.py"), *REPO.glob("experiments/**/*.py"), *REPO.glob("docs/*.md"),
                 *REPO.glob("tests/*.py"), REPO / "README.md"]:
        text = path.read_text()
        assert OUTSIDE not in text, f"{path.relative_to(REPO)} cites the method outside the repository"
        cited |= set(re.findall(r"method\.md,? (?:section |sections )?(\d+(?:\.\d+)?)", text))
    assert cited and cited <= headings, f"cited sections {sorted(cited - headings)} are not headings of docs/method.md"
