#!/usr/bin/env python3
"""upscale.py: an example model for taskgate's `command` backend (python3, standard library only).

It enlarges a PNG by nearest-neighbour sampling. It is a stand-in for a real upscaler, but it
follows the whole contract a command model has with taskgate:

  * the task's `input` object arrives as JSON on stdin:
        {"image_url": "https://.../image.png", "scale": 2}
    `image_url` must be an http(s) URL of an 8-bit RGB or RGBA PNG (a `demo-image` result URL
    works: result URLs need no API key); `scale` is 2, 3 or 4 (default 2);
  * every file left in $TASKGATE_OUTPUT_DIR becomes one result URL (here: upscaled.png);
  * exit 0 = success; exit 75 = temporary failure, taskgate retries while attempts remain;
    any other exit = the task fails, and the end of stderr becomes its failMsg;
  * TASKGATE_TASK_ID, TASKGATE_MODEL and TASKGATE_ATTEMPT say which task and attempt this is.

Configured in examples/taskgate.toml as:
    [models.upscale]
    backend = "command"
    command = ["python3", "examples/models/upscale.py"]
"""
import json
import os
import struct
import sys
import urllib.error
import urllib.request
import zlib

EX_TEMPFAIL = 75


def fail(message, code=1):
    print(message, file=sys.stderr)
    sys.exit(code)


def read_png(data):
    """Decodes a non-interlaced 8-bit RGB or RGBA PNG into (width, height, channels, rows)."""
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        fail("image_url did not return a PNG file")
    pos, idat, header = 8, [], None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        chunk = data[pos + 8:pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", chunk)
        elif kind == b"IDAT":
            idat.append(chunk)
        elif kind == b"IEND":
            break
    width, height, depth, color, _, _, interlace = header
    channels = {2: 3, 6: 4}.get(color)
    if depth != 8 or channels is None or interlace:
        fail("only 8-bit, non-interlaced RGB or RGBA PNGs are supported")
    raw = zlib.decompress(b"".join(idat))
    stride, rows, prev = width * channels, [], bytearray(width * channels)
    for y in range(height):
        start = y * (stride + 1)
        kind, line = raw[start], bytearray(raw[start + 1:start + 1 + stride])
        for i in range(stride):
            a = line[i - channels] if i >= channels else 0
            b = prev[i]
            c = prev[i - channels] if i >= channels else 0
            if kind == 1:
                line[i] = (line[i] + a) & 0xFF
            elif kind == 2:
                line[i] = (line[i] + b) & 0xFF
            elif kind == 3:
                line[i] = (line[i] + (a + b) // 2) & 0xFF
            elif kind == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
                line[i] = (line[i] + pred) & 0xFF
        rows.append(bytes(line))
        prev = line
    return width, height, channels, rows


def write_png(path, width, height, channels, rows):
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    color = {3: 2, 4: 6}[channels]
    raw = b"".join(b"\x00" + row for row in rows)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n")
        f.write(chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, color, 0, 0, 0)))
        f.write(chunk(b"IDAT", zlib.compress(raw, 6)))
        f.write(chunk(b"IEND", b""))


def main():
    task = json.load(sys.stdin)
    url = task.get("image_url")
    scale = task.get("scale", 2)
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        fail("input.image_url must be an http(s) URL of a PNG image")
    if scale not in (2, 3, 4):
        fail("input.scale must be 2, 3 or 4")
    try:
        with urllib.request.urlopen(url, timeout=60) as resp:
            data = resp.read()
    except urllib.error.HTTPError as e:
        # The source may come back (5xx, 429): ask taskgate to retry. Other 4xx will not.
        fail(f"cannot download image_url: HTTP {e.code}", EX_TEMPFAIL if e.code >= 500 or e.code == 429 else 1)
    except (urllib.error.URLError, TimeoutError) as e:
        fail(f"cannot download image_url: {e}", EX_TEMPFAIL)

    width, height, channels, rows = read_png(data)
    px = channels
    big_rows = []
    for row in rows:
        big = b"".join(row[i:i + px] * scale for i in range(0, len(row), px))
        big_rows.extend([big] * scale)
    out = os.path.join(os.environ["TASKGATE_OUTPUT_DIR"], "upscaled.png")
    write_png(out, width * scale, height * scale, channels, big_rows)
    print(f"{os.environ.get('TASKGATE_TASK_ID')} attempt {os.environ.get('TASKGATE_ATTEMPT')}: "
          f"{width}x{height} -> {width * scale}x{height * scale}", file=sys.stderr)


if __name__ == "__main__":
    main()
