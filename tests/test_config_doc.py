"""`--mode config`'s docs: every field of every config has one, taken from the field's own
comment."""

import dataclasses
import importlib

import pytest

import tests.tiny  # noqa: F401  (puts the repository root on sys.path for `configs`)
from spectralmoe_jax import config_doc
from spectralmoe_jax.run_config import parse

CONFIGS = ["custom", "demo", "flair", "five_billion_pixels", "gid_cross_region", "whu_ohs",
           "loveda", "potsdam_vaihingen", "openearthmap"]


@pytest.mark.parametrize("name", CONFIGS)
def test_every_field_of_every_config_has_a_doc(name):
    config = importlib.import_module(f"configs.{name}").get_config()
    missing = [path for path, _, doc in config_doc.fields(config) if not doc]
    assert not missing, f"configs/{name}.py fields without a doc: {missing}"


def test_docs_come_from_trailing_and_preceding_comments():
    @dataclasses.dataclass
    class Example:
        plain: int = 1  # a trailing comment
        # A block above. Its second sentence is left out.
        blocked: int = 2
        bare: int = 3

    docs = config_doc.field_docs(Example)
    assert docs == {"plain": "a trailing comment", "blocked": "A block above."}


def test_resolved_values_show_what_the_run_decides():
    from configs import flair

    config = flair.get_config("vits")
    text = config_doc.describe(config, parse(config))
    assert "model.adapter.width = None -> 384  # d: token width (the VFM's)" in text
    assert "model.wavelengths = None -> (0.665, 0.56, 0.49, 0.83)" in text


@pytest.mark.parametrize("name", CONFIGS)
def test_every_field_can_be_set_from_the_command_line(name):
    """ml_collections refuses to override a plain None ('Type NoneType ... is not supported'):
    every field left None must be a typed placeholder."""
    config = importlib.import_module(f"configs.{name}").get_config()
    untyped = []

    def walk(node, path):
        for key in node.keys():
            child = f"{path}.{key}" if path else key
            if node[key] is None:
                try:
                    node.get_ref(key)  # a typed placeholder has a reference, a plain None not
                except ValueError:
                    untyped.append(child)
            elif hasattr(node[key], "keys") and config_doc._section_of(child) is not None:
                walk(node[key], child)

    walk(config, "")
    assert not untyped, f"configs/{name}.py fields the command line cannot set: {untyped}"
