"""The imports point down: lessons -> trainer -> model and data (docs/code.md draws them).

Every module of the project has a layer; a module may import only modules of lower layers, so
there is no import circle and no low module borrows a helper from a high one. Read from the
source, so that an import inside a function counts too.
"""

import ast
from pathlib import Path

HERE = Path(__file__).resolve().parent

LAYERS = [  # from the bottom up; docs/code.md draws them
    {"cli", "convit"},
    {"augment", "checkpoints"},
    {"data", "runs"},
    {"probes"},
    {"config", "plots"},
    {"train", "bench"},
    {"lessons._report"},
    {"lessons._draw", "lessons._images", "lessons._command"},
    {"lessons._training"},
    {"lessons._protocol"},
    {f"lessons.{path.stem}" for path in (HERE / "lessons").glob("0*.py")} | {"lessons.11_locality_over_training",
                                                                            "lessons.12_what_heads_use"},
    {"lessons.10_far_content", "lessons.13_what_makes_attention_local"},  # they read lessons 5's and 11's
    {"lessons.14_augmentation_and_locality", "lessons.15_depth_and_class_token", "lessons.16_the_grid",
     "lessons.17_model_size"},  # lesson 13's
    {"tools.gpu_check", "tools.gpu_profile", "tools.baselines"},  # drive train.py, bench.py and the lessons; read data.py
]


def project_imports(path: Path, modules: set[str]) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name in modules}
        elif isinstance(node, ast.ImportFrom) and node.module in modules:
            found.add(node.module)
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "import_module":
            found.add(node.args[0].value)
    return found


def test_every_import_points_to_a_lower_layer():
    layer_of = {name: depth for depth, layer in enumerate(LAYERS) for name in layer}
    files = {path.stem: path for path in HERE.glob("*.py") if not path.name.startswith("test_") and path.stem != "conftest"}
    files.update({f"{folder}.{path.stem}": path for folder in ("lessons", "tools") for path in (HERE / folder).glob("*.py")})
    assert set(files) == set(layer_of), "a module without a layer: give it one in LAYERS and in docs/code.md"
    upward = [f"{name} imports {other}" for name, path in sorted(files.items())
              for other in sorted(project_imports(path, set(files))) if layer_of[other] >= layer_of[name]]
    assert upward == []
