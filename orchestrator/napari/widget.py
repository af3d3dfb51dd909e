"""The dlorch dock widget: the viewer's image and labels layers in, segmentation or denoising jobs out, as layers.

Jobs go to the queue the environment configures (``DLORCH_STORE``/``DLORCH_QUEUE``, or the
embedded default), through the same client as the CLI; with no orchestrator or agent running, a
local one is started for the job's duration. Submitting and waiting run in napari's worker thread,
so the viewer stays responsive; results come back to the Qt thread as layers.
"""

from __future__ import annotations

from typing import Any

from qtpy.QtWidgets import (QComboBox, QFormLayout, QLabel, QProgressBar, QPushButton, QSpinBox, QTableWidget,
                            QTableWidgetItem, QVBoxLayout, QWidget)

from dlorch.orchestrator.napari import jobs


def _client():
    """A client of the configured queue and store, as the CLI opens it (one line saying why not)."""
    from dlorch.orchestrator.cli.common import client

    return client()


class DlorchWidget(QWidget):
    """Pick an image (and labels), a task and a number of candidates; run; see jobs and nodes."""

    def __init__(self, viewer: Any, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = viewer
        self.worker = None
        self.results: list[jobs.Result] = []
        self.image_box, self.labels_box, self.task_box = QComboBox(), QComboBox(), QComboBox()
        self.task_box.addItems(["segment", "denoise"])
        self.candidates = QSpinBox(minimum=1, maximum=5, value=1)
        self.epochs = QSpinBox(minimum=0, maximum=1000, value=0, specialValueText="auto")
        self.run_button, self.refresh_button = QPushButton("Run"), QPushButton("Refresh jobs and nodes")
        self.progress, self.status = QProgressBar(), QLabel("")
        self.progress.setRange(0, 100)
        self.jobs_table, self.nodes_table = QTableWidget(0, 4), QTableWidget(0, 3)
        self.jobs_table.setHorizontalHeaderLabels(["job", "name", "status", "epochs"])
        self.nodes_table.setHorizontalHeaderLabels(["node", "job", "heartbeat"])
        form = QFormLayout()
        for name, w in (("image", self.image_box), ("labels", self.labels_box), ("task", self.task_box),
                        ("candidates", self.candidates), ("epochs", self.epochs)):
            form.addRow(name, w)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        for w in (self.run_button, self.progress, self.status, QLabel("jobs"), self.jobs_table, QLabel("nodes"),
                  self.nodes_table, self.refresh_button):
            layout.addWidget(w)
        self.run_button.clicked.connect(self.run)
        self.refresh_button.clicked.connect(self.refresh)
        for event in (viewer.layers.events.inserted, viewer.layers.events.removed):
            event.connect(lambda _=None: self.update_layers())
        self.update_layers()

    def update_layers(self) -> None:
        """Offer the viewer's image layers and labels layers in the two boxes."""
        from napari.layers import Image, Labels

        for box, kind in ((self.image_box, Image), (self.labels_box, Labels)):
            current = box.currentText()
            box.clear()
            box.addItems([layer.name for layer in self.viewer.layers if isinstance(layer, kind)])
            if current:
                box.setCurrentText(current)

    def run(self) -> None:
        """Submit the job in a worker thread; its progress and results come back as signals."""
        from napari.qt.threading import create_worker

        if self.worker is not None:
            return
        image = self.image_box.currentText()
        if not image:
            self.status.setText("error: add an image layer first")
            return
        data = self.viewer.layers[image].data
        epochs = self.epochs.value() or None
        if self.task_box.currentText() == "segment":
            if not self.labels_box.currentText():
                self.status.setText("error: paint labels in a labels layer first (0 = unlabelled, 1..K = classes)")
                return
            labels = self.viewer.layers[self.labels_box.currentText()].data
            work = _with_service(jobs.run_segmentation, self.candidates.value(), data, labels,
                                 self.candidates.value(), epochs)
        else:
            work = _with_service(jobs.run_denoising, 1, data, epochs)
        self.run_button.setEnabled(False)
        self.status.setText("submitting")
        self.worker = create_worker(work)
        self.worker.yielded.connect(self._on_item)
        self.worker.errored.connect(lambda e: self.status.setText(f"error: {e}"))
        self.worker.finished.connect(self._on_finished)
        self.worker.start()

    def _on_item(self, item: Any) -> None:
        if isinstance(item, jobs.Progress):
            self.status.setText(item.text)
            self.progress.setValue(int(100 * item.fraction))
        elif isinstance(item, jobs.Result):
            self.results.append(item)
            if item.kind == "labels":
                self.viewer.add_labels(item.data, name=item.name)
            else:
                self.viewer.add_image(item.data, name=item.name)

    def _on_finished(self) -> None:
        self.worker = None
        self.run_button.setEnabled(True)
        if not self.status.text().startswith("error"):
            self.status.setText(f"done: {len(self.results)} result layers")
            self.progress.setValue(100)
        self.refresh()

    def refresh(self) -> None:
        """List the queue's jobs and nodes."""
        try:
            job_rows, node_rows = jobs.listing(_client())
        except Exception as e:  # an unreachable queue is a line in the widget, not a traceback
            self.status.setText(f"error: {e}")
            return
        for table, rows in ((self.jobs_table, job_rows), (self.nodes_table, node_rows)):
            table.setRowCount(len(rows))
            for r, row in enumerate(rows):
                for col, value in enumerate(row):
                    table.setItem(r, col, QTableWidgetItem(str(value)))


def _with_service(run, agents: int, *args):
    """``run(client, *args)`` as a generator, with a local orchestrator and agents where none are running."""

    def work():
        from dlorch.orchestrator.client import local_service

        c = _client()
        with local_service(c, agents=agents):
            yield from run(c, *args)

    return work
