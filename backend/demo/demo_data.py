"""``python -m backend demo-data OUT_DIR``: a small shapes-world dataset to try the whole workflow on.

It writes::

    OUT_DIR/images/scene_0000.png ...   the scenes
    OUT_DIR/annotations.json            their ground truth in COCO format (bbox = x, y, width, height pixels)
    OUT_DIR/label_config.xml            a Label Studio labeling config for them (boxes + which shapes are present)
    OUT_DIR/tasks.json                  Label Studio tasks pointing at the images (paths relative to OUT_DIR)

The same seed always gives the same files.
"""
from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path
from xml.sax.saxutils import quoteattr

from tqdm import tqdm

from .shapes import SHAPES, Scene, scenes

IMAGES_DIR = "images"


def demo_data_command(args) -> int:
    """CLI entry: write ``args.n`` scenes from ``args.seed`` into ``args.out_dir`` and print a summary."""
    out = Path(args.out_dir)
    counts = write_demo_data(out, args.n, args.seed)
    per_shape = ", ".join(f"{shape} {counts[shape]}" for shape in SHAPES)
    print(f"wrote {args.n} scenes with {sum(counts.values())} objects ({per_shape}) to {out}/: "
          f"{IMAGES_DIR}/, annotations.json, label_config.xml, tasks.json")
    return 0


def write_demo_data(out: Path, n: int, seed: int = 0) -> Counter:
    """Write the dataset described in the module docstring; returns the object count per shape."""
    (out / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
    file_names, rendered = [], []
    for index, scene in enumerate(tqdm(scenes(seed, n), total=n, desc="scenes", unit="scene", file=sys.stderr)):
        file_name = f"{IMAGES_DIR}/scene_{index:04d}.png"
        scene.image.save(out / file_name)
        file_names.append(file_name)
        rendered.append(scene)
    (out / "annotations.json").write_text(json.dumps(coco_ground_truth(rendered, file_names), indent=1))
    (out / "label_config.xml").write_text(label_config(SHAPES))
    (out / "tasks.json").write_text(json.dumps([{"data": {"image": name}} for name in file_names], indent=1))
    return Counter(obj.shape for scene in rendered for obj in scene.objects)


def coco_ground_truth(rendered: list[Scene], file_names: list[str], shapes: tuple[str, ...] = SHAPES) -> dict:
    """COCO detection ground truth; category ids are 1-based positions in ``shapes``."""
    category_id = {shape: i + 1 for i, shape in enumerate(shapes)}
    images, annotations = [], []
    for image_id, (scene, file_name) in enumerate(zip(rendered, file_names), start=1):
        images.append({"id": image_id, "file_name": file_name,
                       "width": scene.image.width, "height": scene.image.height})
        for obj in scene.objects:
            x0, y0, x1, y1 = obj.box
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": category_id[obj.shape], "bbox": [x0, y0, x1 - x0, y1 - y0],
                                "area": (x1 - x0) * (y1 - y0), "iscrowd": 0, "colour": obj.colour})
    categories = [{"id": category_id[shape], "name": shape, "supercategory": "shape"} for shape in shapes]
    return {"info": {"description": "shapes world demo data (python -m backend demo-data)"},
            "images": images, "annotations": annotations, "categories": categories}


def label_config(shapes: tuple[str, ...]) -> str:
    """A labeling config: one box label per shape, and a whole-image multiple choice of the shapes present."""
    labels = "\n".join(f"    <Label value={quoteattr(shape)}/>" for shape in shapes)
    choices = "\n".join(f"    <Choice value={quoteattr(shape)}/>" for shape in shapes)
    return (f'<View>\n  <Image name="image" value="$image"/>\n'
            f'  <RectangleLabels name="label" toName="image">\n{labels}\n  </RectangleLabels>\n'
            f'  <Header value="Which shapes are in the picture?"/>\n'
            f'  <Choices name="shapes" toName="image" choice="multiple">\n{choices}\n  </Choices>\n'
            f'</View>\n')
