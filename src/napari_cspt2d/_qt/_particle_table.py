"""A sortable table of particles (tilts tracked, mean score, largest residual); clicking a row jumps to it.

Backed by numpy columns (:class:`~napari_cspt2d.model.editing.ParticleSummary`), so thousands of particles cost no
per-cell Python objects; only visible cells are formatted.
"""

from __future__ import annotations

import numpy as np
from qtpy.QtCore import QAbstractTableModel, QItemSelectionModel, QModelIndex, QSortFilterProxyModel, Qt, Signal
from qtpy.QtWidgets import QAbstractItemView, QHeaderView, QTableView, QWidget

from ..model.editing import ParticleSummary

__all__ = ["ParticleTableView", "ParticleTableModel"]

SORT_ROLE = Qt.ItemDataRole.UserRole


class ParticleTableModel(QAbstractTableModel):
    """Columns: particle id, number of tilts, mean score, max residual (px)."""

    HEADERS = ("Particle", "Tilts", "Mean score", "Max resid. (px)")

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._columns: list[np.ndarray] = [np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0), np.zeros(0)]

    def set_summary(self, summary: ParticleSummary) -> None:
        self.beginResetModel()
        self._columns = [summary.id, summary.n_tilts, summary.mean_score, summary.max_residual_px]
        self.endResetModel()

    def particle_at(self, row: int) -> int:
        return int(self._columns[0][row])

    def row_of(self, particle: int) -> int | None:
        rows = np.flatnonzero(self._columns[0] == particle)
        return int(rows[0]) if rows.size else None

    def rowCount(self, parent: QModelIndex = QModelIndex()) -> int:  # noqa: B008, N802 - Qt API
        return 0 if parent.isValid() else int(self._columns[0].size)

    def columnCount(self, parent: QModelIndex = QModelIndex()) -> int:  # noqa: B008, N802 - Qt API
        return 0 if parent.isValid() else len(self.HEADERS)

    def data(self, index: QModelIndex, role: int = Qt.ItemDataRole.DisplayRole):
        if not index.isValid():
            return None
        value = self._columns[index.column()][index.row()]
        if role == SORT_ROLE:
            return float(value) if np.isfinite(value) else float("-inf")
        if role == Qt.ItemDataRole.DisplayRole:
            if index.column() < 2:
                return str(int(value))
            return "–" if not np.isfinite(value) else f"{value:.2f}"
        if role == Qt.ItemDataRole.TextAlignmentRole:
            return int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
        return None

    def headerData(self, section: int, orientation: Qt.Orientation, role: int = Qt.ItemDataRole.DisplayRole):  # noqa: N802
        if role == Qt.ItemDataRole.DisplayRole and orientation == Qt.Orientation.Horizontal:
            return self.HEADERS[section]
        return None


class ParticleTableView(QTableView):
    """The particle table. Signal ``particle_clicked(int)``; :meth:`selected_particles` lists the selected ids."""

    particle_clicked = Signal(int)

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.source = ParticleTableModel(self)
        self.proxy = QSortFilterProxyModel(self)
        self.proxy.setSourceModel(self.source)
        self.proxy.setSortRole(SORT_ROLE)
        self.setModel(self.proxy)
        self.setSortingEnabled(True)
        self.sortByColumn(0, Qt.SortOrder.AscendingOrder)
        self.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.setSelectionMode(QAbstractItemView.SelectionMode.ExtendedSelection)
        self.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.verticalHeader().setVisible(False)
        self.verticalHeader().setDefaultSectionSize(20)
        self.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Stretch)
        self.clicked.connect(self._on_clicked)

    def set_summary(self, summary: ParticleSummary) -> None:
        """Show ``summary``; the selected particles stay selected."""
        keep = self.selected_particles()
        self.source.set_summary(summary)
        for particle in keep:
            self._select(particle, QItemSelectionModel.SelectionFlag.Select)

    def _on_clicked(self, index: QModelIndex) -> None:
        self.particle_clicked.emit(self.source.particle_at(self.proxy.mapToSource(index).row()))

    def selected_particles(self) -> list[int]:
        rows = {self.proxy.mapToSource(i).row() for i in self.selectionModel().selectedRows()}
        return sorted(self.source.particle_at(r) for r in rows)

    def show_particle(self, particle: int | None) -> None:
        """Select and scroll to ``particle`` (clears the selection for None)."""
        if particle is None:
            self.clearSelection()
            return
        self._select(particle, QItemSelectionModel.SelectionFlag.ClearAndSelect)

    def _select(self, particle: int, flag) -> None:
        row = self.source.row_of(particle)
        if row is None:
            return
        index = self.proxy.mapFromSource(self.source.index(row, 0))
        self.selectionModel().select(index, flag | QItemSelectionModel.SelectionFlag.Rows)
        self.scrollTo(index)
