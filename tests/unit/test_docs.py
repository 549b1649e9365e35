"""One source for each fact the docs repeat: the knob table and the patch manifest."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from vllm_clasp.core.options import knob_names

DOCS = Path(__file__).resolve().parents[2] / "docs"


def test_configuration_docs_table_lists_exactly_the_knobs():
    text = (DOCS / "configuration.md").read_text()
    table = text[text.index("## CLaSp's knobs"):text.index("### ")]
    documented = re.findall(r"^\| `(clasp_\w+)` \|", table, flags=re.M)
    assert sorted(documented) == sorted(knob_names())


def test_configuration_docs_table_gives_each_knobs_default():
    """The table's default column shows ClaspOptions' default wherever it is a plain value
    (knobs whose default depends on the model, None in ClaspOptions, are described in words)."""
    import json

    from vllm_clasp.core.options import KNOB_PREFIX, ClaspOptions

    text = (DOCS / "configuration.md").read_text()
    table = text[text.index("## CLaSp's knobs"):text.index("### ")]
    cells = {m[0]: m[1] for m in re.findall(r"^\| `(clasp_\w+)` \| [^|]+ \| `([^`]+)` \|", table,
                                              flags=re.M)}
    for field in dataclasses.fields(ClaspOptions):
        if field.default is None or field.default is dataclasses.MISSING:
            continue
        assert cells.get(KNOB_PREFIX + field.name) == json.dumps(field.default), field.name


def test_config_fields_mirror_the_knob_table():
    from vllm_clasp.vllm.config import ClaspSpeculativeConfig

    fields = [f.name for f in dataclasses.fields(ClaspSpeculativeConfig)
              if f.name.startswith("clasp_")]
    assert sorted(fields) == sorted(knob_names())


def test_design_docs_patch_manifest_is_rendered_from_the_patches():
    from vllm_clasp.vllm.patches import manifest

    assert manifest() in (DOCS / "design.md").read_text(), (
        "docs/design.md's patch table differs from vllm_clasp/vllm/patches.py: paste "
        "`python -c 'from vllm_clasp.vllm.patches import manifest; print(manifest())'`")


def test_metrics_docs_list_every_counter():
    """docs/metrics.md has one row per counter of the table that feeds the metrics."""
    from vllm_clasp.core.stats import COUNTERS

    text = (DOCS / "metrics.md").read_text()
    documented = set(re.findall(r"^\| `(vllm:clasp_[a-z_]+)_total` \| counter", text, re.M))
    documented.discard("vllm:clasp_layer_skipped")  # labelled by layer, not in the table
    assert documented == {row.metric for row in COUNTERS}

