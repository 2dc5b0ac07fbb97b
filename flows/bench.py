"""`qrobust bench`: the pipeline's own generation measured on this machine, against its floor.

For each chosen cell of a grid, the stages before generation run (or come from the workspace's
cache) as in a grid run; then the real generation stage runs fresh, at the cell's settings, on a
few problems, outside the cache. Its speed is put against a floor measured in the same run (`tasks.runtime.speed`). Rows are
appended to the store's `bench` table; `estimate_grid_hours` turns bench rows into the
GPU-hours of a whole grid at its full problem counts.
"""

from __future__ import annotations

import dataclasses
import time

from qrobust.tasks.runtime.speed import BenchRow, DeviceRates, measure_device, speed_row


def bench_grid(grid, workspace, select: str | None = None, problems: int = 8, batch_size: int | str | None = None,
               console=None) -> list[BenchRow]:
    """Bench the cells of `grid` whose label contains `select` (default: one cell per model and method)."""
    from qrobust.flows.grid import plan_grid
    from qrobust.tasks.config import GridConfig
    from qrobust.tasks.runtime.environment import default_device, set_library_environment

    set_library_environment()
    cells = _chosen_cells(grid, select)
    device = default_device()
    rates = measure_device(device, {cell.model.dtype for cell in cells})
    rows = []
    for cell in cells:
        generation = dataclasses.replace(cell.generation, shard_size=problems,  # one shard of them all
                                         batch_size=cell.generation.batch_size if batch_size is None else batch_size)
        benchmark = dataclasses.replace(cell.benchmark, limit=problems)
        one = GridConfig(name=f"bench {cell.label}", models=(cell.model,), methods=(cell.method,),
                         benchmarks=(benchmark,), generation=generation, calibration=cell.calibration,
                         sandbox=grid.sandbox)
        [plan] = plan_grid(one)
        if console is not None:
            console.log(f"bench {cell.label}: preparing")
        rows.append(_bench_cell(plan, workspace, rates))
    return rows


def _chosen_cells(grid, select: str | None):
    from qrobust.flows.grid import selected_cells

    if select:
        return selected_cells(grid, (select,))
    seen, chosen = set(), []
    for cell in grid.cells():
        if (cell.model.name, cell.method.label) not in seen:
            seen.add((cell.model.name, cell.method.label))
            chosen.append(cell)
    return chosen


def _bench_cell(plan, workspace, rates: DeviceRates) -> BenchRow:
    """Run the cell's stages up to its checkpoint through the cache, then its first shard fresh."""
    import tempfile
    from pathlib import Path

    from qrobust.tasks.runtime.stage import StageContext

    outcomes, stage_seconds = {}, {}
    generate_call = plan.shards[0][0]
    for call in plan.calls:
        if call is generate_call:
            break
        if call.stage.name in ("generate", "execute"):
            continue
        inputs = tuple(outcomes[v] if v in outcomes else v for v in call.inputs)
        artifact = call.stage.run(workspace, inputs)
        outcomes[call] = artifact
        stage_seconds[call.stage.name] = round(artifact.run.seconds, 3)
        if call.stage.name == "quantize":
            stage_seconds |= {f"quantize.{part}": round(s, 3) for part, s in artifact.seconds.items()}
    inputs = tuple(outcomes[v] if v in outcomes else v for v in generate_call.inputs)
    with tempfile.TemporaryDirectory() as scratch:
        began = time.perf_counter()
        shard = generate_call.stage.function(StageContext("bench", Path(scratch), workspace), *inputs)
        stage_seconds["generate"] = round(time.perf_counter() - began, 3)
    checkpoint = inputs[-1]
    return speed_row(plan.cell, checkpoint, shard, rates, stage_seconds, workspace)


