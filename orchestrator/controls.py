"""Did the reward matter? Each RL row of a table read against the spec's spurious-reward control row.

A spec names its control row (`control: <row name>`): the full method with `method.reward.control: random` (or
shuffled / inverted), everything else as the full method (Shao et al. 2025, "Spurious Rewards": GRPO on random
rewards still gained). Every other row of the same method that trains on its real reward is then compared with it:
`delta_control` (row mean - control mean) and `p_control` (Welch, Holm-adjusted over the rows compared with it),
beside each row's Δ and p against its reference. A tie with the control says the reward's content did not matter
on that data: whatever the RL rows gained over the baseline, a random reward gained too.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from orchestrator.stats import holm, welch_p

DELTA, P = "delta_control", "p_control"


def _reward_control(config: dict[str, Any]) -> str:
    return ((config.get("method") or {}).get("reward") or {}).get("control") or "none"


def _trains_on_reward(config: dict[str, Any]) -> bool:
    from trainers.config import Config        # the method's own config says (trainers.config.MethodConfig)
    return Config.model_validate(config).method.trains_on_reward()


def control_targets(rows: list, control: str | None) -> dict[str, str | None]:
    """Row name -> the control row it is read against (None: not an RL row of the control's method, or the control
    itself). An RL row: same method as the control, trained on a reward (MethodConfig.trains_on_reward: not CLIP-RL's
    decoder-only or curriculum rows, not Seg-R1's SFT) and on its real one. `rows`: orchestrator.spec.Row (name,
    config); pending rows are not passed."""
    out: dict[str, str | None] = {r.name: None for r in rows}
    ctrl = next((r for r in rows if r.name == control), None)
    if ctrl is None:
        return out
    method = (ctrl.config.get("method") or {}).get("name")
    for r in rows:
        if r.name != control and (r.config.get("method") or {}).get("name") == method \
                and _reward_control(r.config) == "none" and _trains_on_reward(r.config):
            out[r.name] = control
    return out


def control_columns(rows: list[dict], values: list[np.ndarray]) -> dict[str, list[float]]:
    """{delta_control, p_control} per table row (NaN where a row has no control): `rows` the table's rows (their
    "control" key, the control row's name), `values` each row's metric values over seeds."""
    names = [r["name"] for r in rows]
    delta, p = [math.nan] * len(rows), [math.nan] * len(rows)
    for i, r in enumerate(rows):
        if r.get("control") in names:
            ref = values[names.index(r["control"])]
            if len(values[i]) and len(ref):
                delta[i] = float(values[i].mean() - ref.mean())
            p[i] = welch_p(values[i], ref)
    return {DELTA: delta, P: list(holm(p))}


def has_control(summary) -> bool:
    return DELTA in summary and bool(np.isfinite(summary[DELTA].to_numpy(dtype=float)).any())


def control_note(summary) -> str | None:
    """The table's line on how to read the Δ-vs-control column, or None without one."""
    if not has_control(summary):
        return None
    return ("Δ vs control: each RL row against the spurious-reward control row, the same method on a reward "
            "without its content; p Welch, Holm-adjusted over the rows compared. A tie (Δ near 0, p large) means "
            "the reward's content did not matter on this data.")
