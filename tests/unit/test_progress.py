"""Progress bars on a terminal, nothing extra elsewhere."""

from __future__ import annotations

import io

from l2sweep.base import progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_bar_on_a_terminal_and_none_in_a_pipe():
    for stream, drawn in ((Terminal(), True), (io.StringIO(), False)):
        assert list(progress.bar(range(3), "scoring", "model", stream)) == [0, 1, 2]
        assert ("scoring" in stream.getvalue() and "/3 " in stream.getvalue()) is drawn
        assert bool(stream.getvalue()) is drawn


def test_a_download_bar_counts_bytes_and_writes_them_through():
    for stream, drawn in ((Terminal(), True), (io.StringIO(), False)):
        out = io.BytesIO()
        with progress.byte_writer(out, 3 << 20, "train-images.gz", stream) as writer:
            for _ in range(3):
                writer.write(b"x" * (1 << 20))
        assert out.getvalue() == b"x" * (3 << 20)
        assert ("train-images.gz" in stream.getvalue() and "/3.00M " in stream.getvalue()) is drawn
        assert bool(stream.getvalue()) is drawn
