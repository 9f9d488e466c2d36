"""The SVG charts reports and benchmarks draw: points land where their values say."""

import re

from tokencredit.evaluate import svg_bar_chart, svg_line_chart, svg_scatter_lines


def coords(svg, tag="circle"):
    return [(float(x), float(y)) for x, y in re.findall(rf'<{tag} cx="([\d.]+)" cy="([\d.]+)"', svg)]


def test_a_scatter_frontier_marks_every_point_in_order_and_drops_non_finite_ones():
    svg = svg_scatter_lines({"fine": [(0.1, 0.5), (0.4, 0.6), (float("nan"), 1.0)], "sft": [(0.0, 0.55)]},
                            "frontier", "KL", "gold")
    fine, sft = coords(svg)[:2], coords(svg)[2:]
    assert len(fine) == 2 and len(sft) == 1
    # Larger x lies to the right, larger y higher up (smaller SVG y).
    assert fine[1][0] > fine[0][0] and fine[1][1] < fine[0][1]
    assert sft[0][0] < fine[0][0]  # KL 0 left of KL 0.1: the x axis spans the data, not 1 unit from its start
    assert svg.count("<polyline") == 2 and "KL" in svg and "frontier" in svg


def test_a_line_chart_has_no_markers_and_an_empty_one_says_so():
    svg = svg_line_chart({"a": [1.0, 2.0, None, 3.0]}, "curve")
    assert "<circle" not in svg and svg.count("<polyline") == 1
    assert "no data" in svg_scatter_lines({"a": []}, "empty")


def bars(svg):
    found = re.findall(r'<rect x="([\d.]+)" y="([\d.]+)" width="[\d.]+" height="([\d.]+)" fill="#\w+" fill-opacity',
                       svg)
    return [(float(x), float(y), float(h)) for x, y, h in found]


def test_bars_stand_at_their_mean_with_a_dot_per_seed_and_groups_side_by_side():
    svg = svg_bar_chart({"aol": {"sft": [0.17, 0.18, 0.16], "tppo": [0.19, 0.2, 0.18]},
                         "trec": {"sft": [0.47], "tppo": [0.5, float("nan")]}}, "F1 over seeds", "token F1")
    drawn = bars(svg)
    assert len(drawn) == 4
    (x_sft, y_sft, h_sft), (x_tppo, y_tppo, h_tppo), (x_sft2, y_sft2, _), (_, y_tppo2, _) = drawn
    assert x_sft < x_tppo < x_sft2  # group order, then bar order
    assert y_tppo < y_sft and h_tppo > h_sft  # the higher mean stands taller
    assert y_tppo2 < y_sft2 < y_tppo  # 0.5 > 0.47 > 0.19 on one axis
    assert len(coords(svg)) == 3 + 3 + 1 + 1  # one dot per finite seed value
    assert "no data" in svg_bar_chart({"a": {"b": []}}, "empty")
