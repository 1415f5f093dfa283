"""A JPEG's structure checked without decoding it: what every backend runs on a sample's bytes before decoding.

A record that fails is skipped by the loader (pipelines/epoch_loader.py counts it). The check is the same for
every backend, so all of them skip the same samples, and it catches what their decoders disagree on: DALI's
libjpeg-turbo decodes a JPEG whose tail was lost (zeroed or cut) into a grey band without an error, the
reference's raises, FFCV's kernel reports a status. Cost: a walk over the header segments (a few dozen bytes
read, ~10 us), then one search for the end-of-image marker from the end of the data.

What it cannot see: damage inside the entropy-coded data (flipped bits decode to wrong pixels, or make the
decoder fail; the reference and FFCV backends then skip the sample too).
"""

from pirl_trainer.pipelines.limits import too_many_pixels

SOI, EOI, SOS = 0xD8, 0xD9, 0xDA
# Start-of-frame markers (baseline, extended, progressive, lossless; Huffman or arithmetic): they hold the size.
_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})  # TEM and RSTn carry no length field


def jpeg_problem(data) -> str | None:
    """None for a structurally sound JPEG; otherwise why the sample cannot be trusted, in a few words.

    Sound: start-of-image marker; header segments whose lengths stay inside the data up to the first
    start-of-scan; a frame header claiming at least 1x1 and at most MAX_DECODE_PIXELS pixels; an end-of-image
    marker after the start of the scan (the entropy-coded data never holds 0xFFD9: its 0xFF bytes are
    stuffed, so a tail lost in transit leaves none; bytes after the marker, which some cameras append, are
    allowed).
    """
    if not isinstance(data, (bytes, bytearray)):
        data = bytes(data)
    n = len(data)
    if n < 4 or data[0] != 0xFF or data[1] != SOI:
        return "not a JPEG (no start-of-image marker)"
    pos, size = 2, None
    while True:
        if pos + 1 >= n:
            return "truncated inside its headers"
        if data[pos] != 0xFF:
            return f"corrupt header (no marker at byte {pos})"
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker in _STANDALONE:
            pos += 2
            continue
        if marker == SOS:
            break
        if marker == EOI or marker == SOI:
            return "no image data (a second start-of-image or an early end-of-image marker)"
        if pos + 4 > n:
            return "truncated inside its headers"
        length = (data[pos + 2] << 8) | data[pos + 3]
        if length < 2 or pos + 2 + length > n:
            return "truncated inside its headers"
        if marker in _SOF:
            if length < 8:
                return "corrupt frame header"
            height = (data[pos + 5] << 8) | data[pos + 6]
            width = (data[pos + 7] << 8) | data[pos + 8]
            size = (height, width)
        pos += 2 + length
    if size is None:
        return "no frame header before its image data"
    height, width = size
    if height == 0 or width == 0:
        return f"its frame header claims {width}x{height} pixels"
    bomb = too_many_pixels(height, width)
    if bomb is not None:
        return bomb
    if data.rfind(b"\xff\xd9", pos) < 0:
        return "truncated (no end-of-image marker after its image data)"
    return None
