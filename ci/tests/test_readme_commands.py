"""README command blocks marked `<!-- ci: run -->` run as written (from an exported copy) and the marker syntax holds."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "ci"))

import readme_commands  # noqa: E402
from readme_commands import ReadmeError, marked_blocks  # noqa: E402

RECIPES = sorted(p.name for p in (ROOT / "recipes").iterdir() if (p / "README.md").is_file())
FASTA_READERS = ("esm2_fa", "gtdb_mamba", "omnibiote", "plant_lm")


def write(tmp_path, text):
    readme = tmp_path / "README.md"
    readme.write_text(text)
    return readme


def test_markers_replacements_and_order(tmp_path):
    readme = write(
        tmp_path,
        "# x\n<!-- ci: run -->\n```bash\necho one\n```\ntext\n```bash\necho unmarked\n```\n"
        '<!-- ci: run; replace "steps=600" -> "steps=4"; replace "a \\"b\\"" -> "c" -->\n'
        '```bash\npython train.py steps=600 a "b"\n```\n',
    )
    blocks = marked_blocks(readme)
    assert [b.command() for b in blocks] == ["echo one\n", "python train.py steps=4 c\n"]
    assert [b.line for b in blocks] == [2, 10]


@pytest.mark.parametrize(
    "text, message",
    [
        ("<!-- ci: run -->\ntext\n```bash\necho\n```\n", "directly above"),
        ("<!-- ci: run -->\n```bash\necho\n", "never closed"),
        ("<!-- ci: run; swap a b -->\n```bash\necho\n```\n", "cannot read"),
    ],
)
def test_malformed_markers_are_errors(tmp_path, text, message):
    with pytest.raises(ReadmeError, match=message):
        marked_blocks(write(tmp_path, text))


def test_a_replacement_that_matches_nothing_is_an_error(tmp_path):
    (block,) = marked_blocks(write(tmp_path, '<!-- ci: run; replace "gone" -> "x" -->\n```bash\necho\n```\n'))
    with pytest.raises(ReadmeError, match="matches nothing"):
        block.command()


def test_a_failing_block_fails_the_recipe(tmp_path):
    readme = write(tmp_path, "<!-- ci: run -->\n```bash\necho fine\n```\n<!-- ci: run -->\n```bash\nfalse\n```\n")
    failures = readme_commands.run_recipe("plant_lm", marked_blocks(readme))
    assert len(failures) == 1 and failures[0].endswith("README.md:5: exit 1")


@pytest.mark.parametrize("recipe", RECIPES)
def test_readme_commands_run_as_written(recipe):
    blocks = readme_commands.recipe_blocks([recipe]).get(recipe, [])
    if not blocks:
        pytest.skip(f"recipes/{recipe}/README.md has no <!-- ci: run --> block")
    assert readme_commands.run_recipe(recipe, blocks) == []


def test_every_fasta_reader_runs_the_one_contract_table():
    """The table lives once, in biorecipes_shared; each FASTA-reading recipe runs it, none keeps a copy."""
    for name in FASTA_READERS:
        test = ROOT / "recipes" / name / "tests" / "test_fasta_contract.py"
        assert "fasta_contract_cases(" in test.read_text(), f"{test} does not run the shared contract"
        assert not list((ROOT / "recipes" / name).rglob("fasta_contract.json")), f"{name} keeps its own copy"
