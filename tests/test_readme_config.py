"""The documentation's configuration text against the code (pages moved out of the README into docs/): the option
column of "Differences from the original code" (docs/differences.md) names only real config keys, and the Recipes part
of docs/configuration.md lists the training keys and shows --print-config's output."""
from __future__ import annotations

import re

import pytest
import yaml
from helpers import REPO

from promptlearn.commands import main as promptlearn_main
from promptlearn.config import RECIPES, SECTIONS, TRAINING_KEYS, all_keys

DOCS = REPO / "docs"
# a config key as the documentation spells one: dotted lowercase names; `<method>.` stands for any method's section and
# a trailing (s) for the key with and without it (data.template(s)). Capitalised dotted names are code
# (`features.PooledPasses`, `CoCoOp.per_image_logits`), and a bare word names a method, not a key.
DOTTED_KEY = re.compile(r"(?:<method>|[a-z_][a-z0-9_]*)(?:\.[a-z_][a-z0-9_]*)+(?:\(s\))?")
ASSIGNED = re.compile(r"([A-Za-z_<>][\w.<>()]*)\s*(?:=|: )\s*(\S+)")  # key=value or key: value, several a span


def section(page: str, title: str) -> str:
    """A section of a page of docs/, from its heading to the next heading of its level or above (or the end)."""
    text = "\n" + (DOCS / page).read_text(encoding="utf-8")
    start = text.index(f"\n{title}\n")
    level = title.split(" ")[0]
    ends = [m.start() for m in re.finditer(r"\n(#+) ", text[start + 1:]) if len(m.group(1)) <= len(level)]
    fences = [m.start() for m in re.finditer(r"\n```", text[start + 1:])]
    # a heading inside a fenced block (a comment in a bash example) ends nothing
    ends = [e for e in ends if sum(f < e for f in fences) % 2 == 0]
    return text[start:start + 1 + ends[0]] if ends else text[start:]


def differences() -> str:
    return section("differences.md", "# Differences from the original code")


def recipes_part() -> str:
    return section("configuration.md", "### Recipes")


def differences_options() -> list[str]:
    """The backticked spans of the last column ("option that restores the original") of the Differences table."""
    rows = [line for line in differences().splitlines() if line.startswith("| ")]
    header, *rows = rows
    assert header.rstrip(" |").endswith("option that restores the original"), header
    spans = []
    for row in rows[1:]:  # the |---| line first
        cells = row.strip().strip("|").split(" | ")
        assert len(cells) == 4, f"a Differences row needs 4 cells (a | inside a cell?): {row[:100]}"
        spans += re.findall(r"`([^`]+)`", cells[3])
    return spans


def named_keys(span: str) -> list[str]:
    """The config keys a backticked span names: the keys of its assignments, or the span itself if it is a
    dotted key; the `recipe` key's value must be a recipe."""
    assigned = ASSIGNED.findall(span)
    for key, value in assigned:
        if key == "recipe":
            assert value in RECIPES, f"`{span}`: recipe must be one of {', '.join(RECIPES)}"
    keys = [key for key, _ in assigned] if assigned else [span] if DOTTED_KEY.fullmatch(span) else []
    expanded = []
    for key in keys:
        expanded += [key.removesuffix("(s)"), key.removesuffix("(s)") + "s"] if key.endswith("(s)") else [key]
    return expanded


def unknown(key: str, keys: dict) -> bool:
    if key.startswith("<method>."):
        return not any(f"{name}.{key.removeprefix('<method>.')}" in keys for name in SECTIONS)
    return key not in keys


def test_the_differences_table_names_only_real_config_keys():
    keys = all_keys()
    spans = differences_options()
    assert len(spans) > 20  # the table was found and read
    wrong = sorted({f"`{span}`: {key}" for span in spans for key in named_keys(span) if unknown(key, keys)})
    assert not wrong, ("the Differences table's option column names keys the config does not have (retired? "
                       "misspelled?): " + "; ".join(wrong))


@pytest.mark.parametrize("span, keys", [
    ("clap.protocol=reference", ["clap.protocol"]),  # a retired switch: refused below once its field is gone
    ("cocoop.truncate_prompts=false cocoop.share_prefix=false", ["cocoop.truncate_prompts", "cocoop.share_prefix"]),
    ("train.max_steps=500 K", ["train.max_steps"]),
    ("data.template(s)", ["data.template", "data.templates"]),
    ("recipe: published", ["recipe"]),
    ("recipe=promptlearn", ["recipe"]),
    ("data.fewshot_import", ["data.fewshot_import"]),
    ("features.PooledPasses", []),
    ("CoCoOp.per_image_logits", []),
    ("linear_probe", []),
])
def test_the_spans_read_as_the_keys_they_name(span, keys):
    assert named_keys(span) == keys


def test_a_removed_key_is_caught():
    keys = {k: v for k, v in all_keys().items() if k != "clap.protocol"}  # as the config reads once it is gone
    assert [k for k in named_keys("clap.protocol=reference") if unknown(k, keys)] == ["clap.protocol"]
    assert not [k for k in named_keys("<method>.grad_checkpointing=true") if unknown(k, keys)]
    assert [k for k in named_keys("<method>.grad_checkpoint=true") if unknown(k, keys)]
    with pytest.raises(AssertionError, match="recipe must be one of"):
        named_keys("recipe=reference")


def test_the_recipes_part_lists_the_training_keys():
    recipes = recipes_part()
    listed = recipes[recipes.index("Every method that trains"):].split("(`coop.lr")[0]
    assert re.findall(r"`(\w+)`", listed) == list(TRAINING_KEYS)


def test_the_recipes_example_is_what_print_config_prints(capsys):
    recipes = recipes_part()
    command = re.search(r"`(promptlearn train [^`]+--print-config)`", recipes.replace("\n", " ")).group(1)
    example = recipes.split("```")[1].strip("\n").splitlines()
    assert 5 <= len(example) <= 8
    assert promptlearn_main(command.split()[1:]) == 0
    printed = capsys.readouterr().out
    effective = printed[printed.index("\neffective:\n") + 1:].splitlines()
    at = 0
    for line in example:  # the example's lines, in order, among the printed ones
        assert line in effective[at:], f"{line!r} is not printed (after line {at}):\n" + "\n".join(effective)
        at = effective.index(line, at) + 1
    assert yaml.safe_load("\n".join(example))["effective"]["coop"]["lr"]["value"] == 0.01


def test_a_difference_the_published_recipe_restores_is_set_by_a_recipe_file():
    """Where the Differences table says the published recipe (the default) restores the original, each key it
    names is one that some recipe file sets: the table and promptlearn/recipes/ cannot drift apart."""
    from promptlearn.recipes import all_recipes

    recipe_keys = {key for entries in all_recipes().values() for r in entries for key in r.settings}
    rows = [line for line in differences().splitlines() if line.startswith("| ")]
    checked, unset = 0, []
    for row in rows[2:]:
        option = row.strip().strip("|").split(" | ")[3]
        if not option.startswith("the default"):
            continue
        for span in re.findall(r"`([^`]+)`", option):
            for key in named_keys(span):
                if key.partition(".")[0] in SECTIONS:  # a method's key (not train.*, data.template, ...)
                    checked += 1
                    if key not in recipe_keys:
                        unset.append(f"{row.split(' | ')[0].strip('| ')}: {key}")
    assert checked >= 10 and not unset, f"keys no recipe file sets: {unset}"
