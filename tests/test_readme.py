"""The README's set-up commands are what CI runs."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = text.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip()]


def test_readme_starts_with_two_setup_commands_and_ci_runs_the_test_one():
    text = (ROOT / "README.md").read_text()
    assert text.index("```bash") < text.index("\n## "), "the set-up commands must come first"
    commands = _readme_commands()
    assert len(commands) == 2
    install_and_run, install_and_test = commands
    assert install_and_run == "bash install.sh && impure demo"  # the main job: the demo on the embedded model
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith(("#", "set ", "cd ", "apt-get "))]
    assert ci == [install_and_test]
