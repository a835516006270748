"""The documentation: README.md stays a front page, every relative link in README.md and docs/*.md
leads to a file (and heading) that exists, and the README's test command is what CI runs."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MARKDOWN = [README, *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 200  # a front page: the manual lives in docs/

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
CODE_SPAN = re.compile(r"`[^`]*`")


def prose_lines(path: Path) -> list[str]:
    """The lines of a markdown file outside fenced and indented code blocks."""
    lines, fenced = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if not fenced and not line.startswith("    "):
            lines.append(line)
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = CODE_SPAN.sub(lambda m: m.group(0)[1:-1], heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in prose_lines(path):
        match = re.match(r"#{1,6} (.+)", line)
        if match:
            base = slug(match.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def relative_links(path: Path) -> list[str]:
    targets = []
    for line in prose_lines(path):
        targets += LINK.findall(CODE_SPAN.sub("", line))
    return [t for t in targets if not re.match(r"[a-z][a-z0-9+.-]*:", t)]  # http:, https:, mailto:


def code_lines(path: Path) -> list[str]:
    """The lines of the indented (4-space) code blocks, stripped."""
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.startswith("    ")]


def ci_command() -> str:
    """The command .ci/run runs: its lines that are not the shebang, comments, `set` or `cd`."""
    lines = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    commands = [
        line.strip() for line in lines if line.strip() and not line.lstrip().startswith(("#", "set ", "cd "))
    ]
    assert commands, ".ci/run runs no command"
    return "\n".join(commands)


def test_readme_is_a_front_page():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n < README_MAX_LINES, f"README.md has {n} lines; move detail to docs/ (limit {README_MAX_LINES})"


def test_markdown_files_exist():
    assert (ROOT / "docs").is_dir() and len(MARKDOWN) > 1, "docs/*.md is missing"


@pytest.mark.parametrize("path", MARKDOWN, ids=[str(p.relative_to(ROOT)) for p in MARKDOWN])
def test_relative_links_resolve(path):
    broken = []
    for target in relative_links(path):
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if ROOT not in dest.parents and dest != ROOT:
            broken.append(f"{target} (outside the repository)")
        elif not dest.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target} (no heading '#{anchor}' in {dest.relative_to(ROOT)})")
    assert not broken, f"{path.relative_to(ROOT)}: broken links: {broken}"


def test_readme_test_command_is_what_ci_runs():
    ci = ci_command()
    readme = code_lines(README)
    assert ci in readme, f"README.md does not show .ci/run's command verbatim: {ci!r}"
    # every command in the README that sets up the test environment is exactly CI's
    others = [line for line in readme if "setup.sh test" in line and line != ci]
    assert not others, f"README.md shows test commands that differ from .ci/run's {ci!r}: {others}"


def test_link_checker_sees_links_and_anchors(tmp_path):
    """The checks above are not vacuous: links are found, and headings give GitHub's anchors."""
    assert "docs/kernels.md#checking-a-gpu" in relative_links(README)
    page = tmp_path / "page.md"
    page.write_text(
        "# Native extension (csrc/)\n\n    # not a heading\n## `train osr` 7/8/9\n## Tests\n## Tests\n"
    )
    assert anchors(page) == {"native-extension-csrc", "train-osr-789", "tests", "tests-1"}


def test_alpha_is_documented_as_the_code_and_the_presets_have_it():
    """Issue 20, item 5: what alpha defaults to, and the paper's value per dataset, as the README and
    docs/training.md#alpha-and-beta state them, are the library's default and the presets' values."""
    import inspect
    import json

    from drainage_fast import DrainageLoss, fused_drainage_loss

    default = inspect.signature(fused_drainage_loss).parameters["alpha"].default
    assert inspect.signature(DrainageLoss).parameters["alpha"].default == default
    assert f"`alpha` defaults to {default}" in README.read_text()
    training = (ROOT / "docs" / "training.md").read_text()
    section = training.split("## Alpha and beta", 1)[1].split("\n## ", 1)[0]
    assert f"The library's default** is alpha = {default}" in section
    paper = {"cifar10": ("CIFAR-10", 1.0), "cifar100": ("CIFAR-100", 0.1)}
    paper |= {"webvision": ("WebVision", 0.1), "clothing1m": ("Clothing1M", 0.01)}
    for preset, (dataset, alpha) in paper.items():
        assert re.search(rf"{dataset} {alpha}\b", " ".join(section.split())), dataset
        config = json.loads((ROOT / "train" / "configs" / f"{preset}_drainage.json").read_text())
        assert config["loss_params"]["alpha"] == alpha, preset
