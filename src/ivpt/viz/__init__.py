"""Explanations people can look at: single-image figures (``ivpt explain``) and the HTML report
(``ivpt report``).

- :mod:`ivpt.viz.palette`: one colour per concept, the same in every figure of a model;
- :mod:`ivpt.viz.maps`: pure functions on one image's maps and scores (overlay, region areas, part
  contributions, hierarchy edges);
- :mod:`ivpt.viz.drawing`: matplotlib pieces (Agg, no pyplot) shared by both outputs;
- :mod:`ivpt.viz.explain`: :func:`explain` (data for one image), :func:`explain_files` (PNG + JSON);
- :mod:`ivpt.viz.concept_stats`: data-set-wide concept statistics in one streaming pass;
- :mod:`ivpt.viz.report`: the HTML report's figures and page (``ivpt report`` itself,
  :func:`ivpt.engine.report.build_report`, scores the model first).

Models are loaded through :mod:`ivpt.model.pretrained`; nothing here imports the training engine.
"""

from __future__ import annotations

from ivpt.viz.explain import explain, explain_files, explanation_figure
from ivpt.viz.maps import FlowEdge, grouping_flow, overlay_maps, part_contributions, region_areas
from ivpt.viz.palette import concept_palette

__all__ = [
    "FlowEdge",
    "concept_palette",
    "explain",
    "explain_files",
    "explanation_figure",
    "grouping_flow",
    "overlay_maps",
    "part_contributions",
    "region_areas",
]
