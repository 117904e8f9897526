from pathlib import Path

import pytest

from utils.prompts import DEFAULT_PROMPTS, load_prompts, parse_spec, subsample

FIXTURES = Path(__file__).parent / "fixtures"
CATEGORIES = {"people", "animals", "text_rendering", "counting", "scenes", "styles"}


def test_default_set_has_200_unique_prompts_in_every_category():
    prompts = load_prompts("default")
    assert len(prompts) >= 200
    assert len({item["prompt"] for item in prompts}) == len(prompts)
    assert {item["category"] for item in prompts} == CATEGORIES
    per_category = {c: sum(item["category"] == c for item in prompts) for c in CATEGORIES}
    assert min(per_category.values()) >= 30
    text = [item["prompt"] for item in prompts if item["category"] == "text_rendering"]
    assert '"OPEN"' in text[0]  # literal quotes survive the TSV reader


def test_drawbench_csv():
    prompts = load_prompts(str(FIXTURES / "drawbench_sample.csv"))
    assert [p["category"] for p in prompts] == ["Colors", "Text", "Counting"]
    assert prompts[1]["prompt"] == "A sign that says 'Deep Learning', with a comma, in it."
    assert {p["source"] for p in prompts} == {"drawbench"}


def test_parti_tsv():
    prompts = load_prompts(f"parti:{FIXTURES / 'parti_sample.tsv'}")
    assert [p["prompt"] for p in prompts][0] == "bond"
    assert prompts[2]["prompt"] == 'A sign that says "Hello"'
    assert [p["category"] for p in prompts] == ["Abstract", "Arts", "Arts"]


def test_coco_takes_first_caption_per_image_in_image_order():
    prompts = load_prompts(str(FIXTURES / "coco_captions_sample.json"))
    assert [p["image_id"] for p in prompts] == [7, 42]
    assert [p["prompt"] for p in prompts] == ["A man riding a bike down a street.", "A brown dog sleeping on a red sofa."]


def test_plain_text_skips_blank_and_comment_lines():
    prompts = load_prompts(f"text:{FIXTURES / 'plain_prompts.txt'}")
    assert [p["prompt"] for p in prompts] == ["A photo of an astronaut riding a horse", "A watercolor of a lighthouse"]


def test_limit_is_a_deterministic_ordered_subsample():
    full = load_prompts("default")
    first = load_prompts("default", limit=12, seed=3)
    assert first == load_prompts("default", limit=12, seed=3)
    assert first != load_prompts("default", limit=12, seed=4)
    positions = [full.index(item) for item in first]
    assert len(first) == 12 and positions == sorted(positions)
    assert subsample(full, 10_000) == full


def test_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="extension"):
        parse_spec(str(tmp_path / "prompts.xlsx"))
    with pytest.raises(ValueError, match="unknown prompt format 'yaml'"):
        parse_spec("yaml:prompts.yaml")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_prompts(str(tmp_path / "missing.csv"))
    bad = tmp_path / "bad.csv"
    bad.write_text("Prompt,Kind\nA cat,Animals\n")
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['Prompts', 'Category'\]"):
        load_prompts(str(bad))
    not_coco = tmp_path / "x.json"
    not_coco.write_text('{"images": []}')
    with pytest.raises(ValueError, match="not a COCO captions file"):
        load_prompts(str(not_coco))
    assert parse_spec("default") == ("default", DEFAULT_PROMPTS)
