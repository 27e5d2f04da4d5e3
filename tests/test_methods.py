"""The method interface (furnace/methods/): every listed method is a module with a Method, the engine names
none of them, and a method written outside the library trains through the real engine once its name is
listed (what adding a method takes: one module plus its name in furnace.settings.METHODS)."""
import ast
import re
import sys
import types
from pathlib import Path

import pytest
import torch

import furnace.settings as settings
from furnace.methods.base import Method, finish, supervised_loss
from trainkit import ROOT, overrides, train_in_process

pytestmark = pytest.mark.usefixtures("one_thread")


def test_every_listed_method_is_a_module_with_a_method():
    for name in settings.METHODS:
        module = __import__(f"furnace.methods.{name}", fromlist=["METHOD"])
        assert issubclass(module.METHOD, Method), name


def test_the_engine_names_no_method():
    """No string, name or attribute of furnace/engine.py's code (docstrings and comments aside) is a method's
    name or a method's part."""
    tree = ast.parse((ROOT / "furnace" / "engine.py").read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)) and node.body
                  and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    words = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            words.update(re.findall(r"[A-Za-z_]+", node.value))
        elif isinstance(node, ast.Name):
            words.add(node.id)
        elif isinstance(node, ast.Attribute):
            words.add(node.attr)
    assert not words & {*settings.METHODS, "CPSPair", "teachers", "teacher_labels"}
    assert {"method", "uses_unlabeled", "step"} <= words  # the words it does use


class FlipConsistent(Method):
    """A method the library does not have: CE on the labeled images and on their mirror image."""

    def step(self, model, batch):
        x, y = batch["x_l"], batch["y_l"]
        terms = {"sup": supervised_loss(self.C, model(x), y, self.info.world_size),
                 "sup_flip": supervised_loss(self.C, model(x.flip(-1)), y.flip(-1), self.info.world_size)}
        return finish(terms)


def test_a_new_method_is_one_module_plus_its_name(toy, tmp_path, monkeypatch):
    module = types.ModuleType("furnace.methods.flip_consistent")
    module.METHOD = FlipConsistent
    monkeypatch.setitem(sys.modules, "furnace.methods.flip_consistent", module)
    monkeypatch.setattr(settings, "METHODS", (*settings.METHODS, "flip_consistent"))
    summary = train_in_process(overrides(toy, tmp_path, method="flip_consistent", epochs=1, iters_per_epoch=2))
    ckpt = torch.load(Path(summary["checkpoint"]), map_location="cpu", weights_only=False)
    assert ckpt["method"] == "flip_consistent" and set(ckpt["losses"]) == {"total", "sup", "sup_flip"}
    assert ckpt["losses"]["total"] == pytest.approx(ckpt["losses"]["sup"] + ckpt["losses"]["sup_flip"], rel=1e-5)
    assert "model_b" not in ckpt and ckpt["iteration"] == 2


def test_an_unlisted_method_is_refused_by_name(toy, tmp_path):
    with pytest.raises(ValueError, match="method='flip_consistent'"):
        train_in_process(overrides(toy, tmp_path, method="flip_consistent"))
