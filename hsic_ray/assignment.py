"""The maximum-weight one-to-one matching of rows to columns (the linear assignment problem), by the Hungarian
method with potentials: rows are added one at a time, each by a shortest augmenting path over reduced costs.
O(rows^2 x columns), with the scan over columns in numpy.

Here rather than scipy's `linear_sum_assignment`: a run matches its classes to the last layer's units once, at
its end, and importing scipy.optimize for it cost more than the whole match (docs/results.md, "The end of a
run in one pass").
"""

from __future__ import annotations

import numpy as np


def max_weight_matching(weights: np.ndarray) -> np.ndarray:
    """column [rows]: distinct columns, one per row, of the largest total weight. Needs rows <= columns."""
    cost = -np.asarray(weights, dtype=np.float64)
    rows, columns = cost.shape
    if rows > columns:
        raise ValueError(f"cannot match {rows} rows to {columns} distinct columns; needs rows <= columns")
    if not np.isfinite(cost).all():
        raise ValueError("weights must be finite")
    row_potential, column_potential = np.zeros(rows + 1), np.zeros(columns + 1)
    # Index 0 is a virtual column where each new row's path starts; rows are numbered from 1, 0 meaning none.
    row_of_column = np.zeros(columns + 1, dtype=np.int64)
    for row in range(1, rows + 1):
        previous = _shortest_augmenting_path(cost, row, row_potential, column_potential, row_of_column)
        _augment(previous, row_of_column)
    matched = np.flatnonzero(row_of_column[1:])
    column = np.empty(rows, dtype=np.int64)
    column[row_of_column[1:][matched] - 1] = matched
    return column


def _shortest_augmenting_path(
    cost: np.ndarray, row: int, row_potential: np.ndarray, column_potential: np.ndarray, row_of_column: np.ndarray
) -> tuple[np.ndarray, int]:
    """Dijkstra over reduced costs from `row` to a free column, updating the potentials in place; the path
    as each column's predecessor column, and the free column it ends at."""
    columns = cost.shape[1]
    row_of_column[0] = row
    distance = np.full(columns + 1, np.inf)
    previous = np.zeros(columns + 1, dtype=np.int64)
    visited = np.zeros(columns + 1, dtype=bool)
    column = 0
    while True:
        visited[column] = True
        reached_row = row_of_column[column]
        free = ~visited
        free[0] = False
        reduced = np.full(columns + 1, np.inf)
        reduced[1:] = cost[reached_row - 1] - row_potential[reached_row] - column_potential[1:]
        shorter = free & (reduced < distance)
        distance[shorter] = reduced[shorter]
        previous[shorter] = column
        candidates = np.where(free, distance, np.inf)
        column = int(np.argmin(candidates))
        step = candidates[column]
        row_potential[row_of_column[visited]] += step
        column_potential[visited] -= step
        distance[free] -= step
        if row_of_column[column] == 0:
            return previous, column


def _augment(path: tuple[np.ndarray, int], row_of_column: np.ndarray) -> None:
    previous, column = path
    while column:
        row_of_column[column] = row_of_column[previous[column]]
        column = previous[column]
