"""Label Studio itself accepts our configs and their model_* attributes (it validates on project creation)."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_label_studio_accepts_the_example_config(label_studio):
    xml = (ROOT / "label_config.xml").read_text()
    project = label_studio.create_project("bees", xml)
    assert "model_prompt" in label_studio.project(project["id"])["label_config"]
