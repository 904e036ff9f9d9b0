"""The README tells the truth: its settings table is the code's, its test command is what CI runs."""
from pathlib import Path

from backend.config import env_fields, settings_table

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_settings_table_is_generated_from_the_code():
    assert settings_table() in README, "regenerate it: python -m backend settings"
    for field in env_fields():
        assert f"`{field.name.upper()}`" in README


def test_the_readme_test_command_is_what_ci_runs():
    assert "bash scripts/test.sh" in README
    assert "exec bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text()


def test_every_bench_script_is_in_the_readme():
    for script in sorted((ROOT / "bench").glob("*.py")):
        assert f"bench/{script.name}" in README, f"{script.name} has no figures in the README"
