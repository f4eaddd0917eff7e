"""The page that explores the 2-D latent plane: explorer.html, one self-contained file.

Every run with Z = 2 writes it beside its figures (report.measure_and_draw). It opens from disk in
a browser, with no server, no network and no library: plain JavaScript and two canvases. It holds
the decoder's weights, so that the browser decodes z itself, as VAE.decode does here:

    h = relu(z W1 + b1)        the decoder's hidden layer, H units
    l = h W2 + b2              the logits of p(x|z), one per pixel (D = 784; of a decoder with a
                               sigma per pixel, its first D outputs, the means' logits)
    E[x|z] = mean(l)           sigmoid(l) for the Bernoulli and the Gaussian, and
                               sigmoid(l) - d log C / dl for the continuous Bernoulli (cb_mean)

and what the plane shows around it, computed here: the codes (posterior means) of the first
SHOWN test images, their classes and their pixels; the prior's contours; the holes, where the
mixture fitted to q(z) has a density below the hole threshold (analysis.prior_hole_fraction), on a
grid. The page's window.vaeDecode(z0, z1) returns the 784 means, so that a test can hold the
browser's decoding to NumPy's (tests/test_explorer.py).

The arrays travel as base64 text (float32 little-endian, or uint8), 76 characters a line, each in
a <script type="text/plain"> block that the browser does not run; the rest as JSON.
"""
import base64
import html
import json
import math
import os

import numpy as np

from mnist import atomic_path

from lab.gmm import gmm_log_density
from lab.models import likelihood_label, prior_label

SHOWN = 1000            # the first SHOWN test images: the page has their codes, labels, pixels
HOLE_GRID = 128         # the holes on a HOLE_GRID x HOLE_GRID grid of the plane
CONTOUR_GRID = 161      # log p(z) on a CONTOUR_GRID x CONTOUR_GRID grid, for the prior's contours
PRIOR_RADII = (1, 2, 3)     # the contours hold the prior mass of N(0, I)'s 1, 2, 3 sigma circles


def plane_limit(mu, z_prior):
    """Half the width of the square the page shows, [-limit, limit]^2: as figures.latent_plane's,
    at least 4, wider when the codes (or the prior's draws) spread further."""
    spread = np.abs(np.concatenate([mu, z_prior]))
    return max(4.0, 1.1 * float(np.quantile(spread, 0.995)))


def cell_centres(limit, n):
    """The centres of n equal cells across [-limit, limit]."""
    width = 2 * limit / n
    return -limit + (np.arange(n) + 0.5) * width        # cell i's centre: -limit + (i + 1/2) width


def hole_grid(gmm, hole_threshold, limit, n=HOLE_GRID):
    """(n, n) uint8, 1 where log q_fit(z) < the hole threshold, at the centres of the cells of the
    plane as a canvas draws it: row 0 at the top (z1 largest), column 0 at the left (z0 least)."""
    z0 = cell_centres(limit, n)
    z1 = z0[::-1]
    grid = np.stack(np.meshgrid(z0, z1), -1).reshape(-1, 2)
    # in a hole: log q_fit(z) below the density of 99% of the test codes
    in_hole = gmm_log_density(gmm, grid) < hole_threshold
    return in_hole.reshape(n, n).astype(np.uint8)


def prior_contours(model, z_prior, limit, n=CONTOUR_GRID):
    """The prior's contours: for r = 1, 2, 3, the line log p(z) = c_r around the region of highest
    density that holds 1 - exp(-r^2 / 2) of the prior's mass (for N(0, I), the circle of radius
    r). Under p, P(log p(z) < c_r) = exp(-r^2 / 2), so c_r is that quantile of log p over the
    prior's own draws z_prior: one rule for N(0, I) and the learned priors. The lines are traced by
    contourpy (matplotlib's own contouring, installed with it) on an n x n grid; each is a list
    [z0, z1, z0, z1, ...]."""
    from contourpy import LineType, contour_generator
    log_p_draws = model.log_prior(np.asarray(z_prior, np.float64))
    t = np.linspace(-limit, limit, n)
    grid = np.stack(np.meshgrid(t, t), -1).reshape(-1, 2)
    log_p = model.log_prior(grid).reshape(n, n)         # row j at z1 = t[j], column i at z0 = t[i]
    lines = contour_generator(t, t, log_p, line_type=LineType.Separate)
    contours = []
    for r in PRIOR_RADII:
        outside = math.exp(-r * r / 2)                  # the mass outside the contour
        level = float(np.quantile(log_p_draws, outside))
        traced = [np.round(line, 4).ravel().tolist() for line in lines.lines(level)]
        contours.append({"radius": r, "mass": 1 - outside, "lines": traced})
    return contours


def decoder_weights(model):
    """The decoder's Linear, ReLU, Linear as the page holds them: W1 (2, H), b1 (H,), W2 (H, D),
    b2 (D,), in float32. Of a decoder with a sigma per pixel, the outputs of the means only (the
    first D)."""
    first, _, second = model.decoder.layers
    d = model.n_in
    return {"W1": first.params["W"], "b1": first.params["b"],
            "W2": second.params["W"][:, :d], "b2": second.params["b"][:d]}


def base64_lines(array, dtype):
    """The array's bytes (row by row, in dtype: '<f4' or 'u1') as base64, 76 characters a line."""
    raw = np.ascontiguousarray(array, dtype=dtype).tobytes()
    return base64.encodebytes(raw).decode("ascii")


def page_blocks(model, found, x_test, y_test):
    """{block id: (array, dtype)}: the decoder's weights, and the first SHOWN test images' codes,
    labels and pixels."""
    n = min(SHOWN, len(found["mu_test"]))
    blocks = {name: (W, "<f4") for name, W in decoder_weights(model).items()}
    blocks["codes"] = (found["mu_test"][:n], "<f4")                 # posterior means, (n, 2)
    blocks["labels"] = (np.asarray(y_test[:n]), "u1")
    blocks["images"] = (np.asarray(x_test[:n]).reshape(n, -1), "u1")    # pixels 0..255, (n, 784)
    return blocks


def page_meta(model, found, hole_threshold, class_names, limit):
    """What the page needs besides the arrays, as JSON."""
    return {"title": f"{prior_label(model)} prior, {likelihood_label(model)} likelihood",
            "likelihood": model.likelihood.name, "limit": limit, "class_names": class_names,
            "hole_grid": HOLE_GRID, "hole_threshold": hole_threshold,
            "prior_contours": prior_contours(model, found["z_prior"], limit)}


def write_explorer(out, model, found, hole_threshold, x_test, y_test, class_names):
    """Write explorer.html into the folder out for a model with Z = 2, whole or not at all; return
    its path. found: analysis.analyze's second result (mu_test, z_prior, gmm); hole_threshold: the
    log q_fit(z) below which the plane is a hole; x_test (N, 784) uint8 and y_test: the test images
    and their labels; class_names: the ten labels' names."""
    if model.latent != 2:
        raise ValueError(f"the explorer shows a 2-D plane; this model has Z = {model.latent}")
    limit = plane_limit(found["mu_test"], found["z_prior"])
    blocks = page_blocks(model, found, x_test, y_test)
    blocks["holes"] = (hole_grid(found["gmm"], hole_threshold, limit), "u1")
    meta = page_meta(model, found, hole_threshold, class_names, limit)
    block_text = []
    for name, (array, dtype) in blocks.items():
        block_text.append(f'<script type="text/plain" id="{name}">\n'
                          f"{base64_lines(array, dtype)}</script>")
    # "</" inside a script would end it: JSON allows "<\/" for "</"
    meta_text = json.dumps(meta).replace("</", "<\\/")
    page = PAGE.replace("%TITLE%", html.escape(meta["title"]))
    page = page.replace("%BLOCKS%", "\n".join(block_text))
    page = page.replace("%META%", meta_text)
    path = os.path.join(out, "explorer.html")
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(page)
    return path


# ---- the page ------------------------------------------------------------------------------------

PAGE = r"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>The latent plane: %TITLE%</title>
<style>
  body { font: 14px sans-serif; margin: 16px; color: #222; }
  h1 { font-size: 18px; margin: 0 0 8px 0; }
  .row { display: flex; gap: 24px; align-items: flex-start; }
  canvas { display: block; }
  .pixels { image-rendering: pixelated; border: 1px solid #ccc; }
  .note { color: #555; max-width: 480px; margin: 6px 0; }
  #legend span { display: inline-block; margin: 2px 10px 2px 0; }
  #legend i { display: inline-block; width: 10px; height: 10px; margin-right: 4px; }
  .pair { display: flex; gap: 12px; margin-top: 10px; }
</style>
</head>
<body>
<h1>The latent plane: %TITLE%</h1>
<p class="note">Move the pointer over the plane: the right shows its decoding there. Click a dot
  to see its test image; tick <i>path</i> and click two points for the straight path between
  them.</p>
<div class="row">
  <div>
    <canvas id="plane" width="480" height="480"></canvas>
    <div id="legend"></div>
    <p class="note" id="key"></p>
  </div>
  <div>
    <canvas id="decoded" class="pixels" width="280" height="280"></canvas>
    <p id="where">the mean of p(x|z) at the pointer's z</p>
    <label><input type="checkbox" id="path-mode">
      path: click two points (or codes), see the images along the straight line</label>
    <div class="pair">
      <div><canvas id="test-image" class="pixels" width="112" height="112"></canvas>
        <p class="note" id="test-caption">Click a code: its test image</p></div>
      <div><canvas id="test-decoded" class="pixels" width="112" height="112"></canvas>
        <p class="note">and its decoding, the mean of p(x|z) at z = mu(x)</p></div>
    </div>
    <canvas id="path" class="pixels" width="480" height="48"></canvas>
    <p class="note" id="path-caption"></p>
  </div>
</div>
%BLOCKS%
<script type="application/json" id="meta">%META%</script>
<script>
"use strict";

// ---- the data: base64 blocks of float32 (little-endian, as numpy wrote them) or uint8 ----

function blockBytes(id) {
  const text = document.getElementById(id).textContent.replace(/\s/g, "");
  const binary = atob(text);
  const bytes = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i++) {
    bytes[i] = binary.charCodeAt(i);
  }
  return bytes;
}

function blockFloats(id) {
  const bytes = blockBytes(id);
  const view = new DataView(bytes.buffer);
  const values = new Float32Array(bytes.length / 4);
  for (let i = 0; i < values.length; i++) {
    values[i] = view.getFloat32(4 * i, true);
  }
  return values;
}

const META = JSON.parse(document.getElementById("meta").textContent);
const W1 = blockFloats("W1");       // (2, H), row by row
const b1 = blockFloats("b1");       // (H,)
const W2 = blockFloats("W2");       // (H, D), row by row
const b2 = blockFloats("b2");       // (D,)
const H = b1.length;
const D = b2.length;
const CODES = blockFloats("codes");     // the posterior means of the first N test images, (N, 2)
const LABELS = blockBytes("labels");    // their classes
const IMAGES = blockBytes("images");    // their pixels, 0..255, (N, D)
const HOLES = blockBytes("holes");      // 1 where the plane is a hole, (G, G), row 0 at the top
const N = LABELS.length;
const G = META.hole_grid;
const LIMIT = META.limit;               // the plane shows [-LIMIT, LIMIT] on both axes

// ---- the decoder: the same two products as VAE.decode ----

// h = relu(z W1 + b1), l = h W2 + b2: the logits of p(x|z)
function decodeLogits(z0, z1) {
  const h = new Float64Array(H);
  for (let i = 0; i < H; i++) {
    const a = z0 * W1[i] + z1 * W1[H + i] + b1[i];     // (z W1 + b1)_i
    h[i] = Math.max(a, 0);                              // relu
  }
  const logits = Float64Array.from(b2);
  for (let i = 0; i < H; i++) {
    if (h[i] === 0) {
      continue;                                         // a unit at zero adds nothing
    }
    const row = i * D;
    for (let j = 0; j < D; j++) {
      logits[j] += h[i] * W2[row + j];                  // l_j = b2_j + sum_i h_i W2_ij
    }
  }
  return logits;
}

// sigmoid(l) = (1 + tanh(l / 2)) / 2, written as vae.sigmoid writes it
function sigmoid(l) {
  return 0.5 + 0.5 * Math.tanh(0.5 * l);
}

// d log C / dl = 1/l - 1/sinh(l), C the continuous Bernoulli's normaliser. The two terms cancel
// near 0, so for |l| < 0.2 its Taylor series, in Horner's form, as
// likelihoods.cb_log_normalizer_grad computes it:
// l/6 - 7 l^3/360 + 31 l^5/15120 - 127 l^7/604800 + 73 l^9/3421440 - 1414477 l^11/653837184000
function cbLogNormalizerGrad(l) {
  if (Math.abs(l) < 0.2) {
    const l2 = l * l;
    let inner = 73 / 3421440 - l2 * 1414477 / 653837184000;
    inner = -127 / 604800 + l2 * inner;
    inner = 31 / 15120 + l2 * inner;
    inner = -7 / 360 + l2 * inner;
    return l * (1 / 6 + l2 * inner);
  }
  return 1 / l - 1 / Math.sinh(l);      // sinh is Infinity for |l| > 710: 1 / Infinity = 0
}

// E[x|z], the mean of p(x|z) at logits l (likelihood.mean)
function mean(l) {
  if (META.likelihood === "cb") {
    return sigmoid(l) - cbLogNormalizerGrad(l);     // the continuous Bernoulli: not sigmoid(l)
  }
  return sigmoid(l);                                // the Bernoulli's and the Gaussian's mean
}

function decode(z0, z1) {
  const logits = decodeLogits(z0, z1);
  const means = new Float64Array(D);
  for (let j = 0; j < D; j++) {
    means[j] = mean(logits[j]);
  }
  return means;
}

// ---- the plane: z0 grows to the right, z1 upwards ----

const plane = document.getElementById("plane");
const SIDE = plane.width;
const COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
                 "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"];   // matplotlib's tab10

function toPixel(z0, z1) {
  return [(z0 + LIMIT) / (2 * LIMIT) * SIDE, (LIMIT - z1) / (2 * LIMIT) * SIDE];
}

function toLatent(x, y) {
  return [-LIMIT + x / SIDE * 2 * LIMIT, LIMIT - y / SIDE * 2 * LIMIT];
}

function inHole(z0, z1) {
  const column = Math.floor((z0 + LIMIT) / (2 * LIMIT) * G);
  const row = Math.floor((LIMIT - z1) / (2 * LIMIT) * G);
  if (row < 0 || row >= G || column < 0 || column >= G) {
    return true;                        // off the grid: far from every code
  }
  return HOLES[row * G + column] === 1;
}

// The test codes, the holes and the prior's contours do not move: drawn once, then copied.
const background = document.createElement("canvas");
background.width = SIDE;
background.height = SIDE;

function drawBackground() {
  const context = background.getContext("2d");
  context.fillStyle = "white";
  context.fillRect(0, 0, SIDE, SIDE);
  // the holes: grey, one grid cell a pixel, stretched smoothly over the plane
  const cells = document.createElement("canvas");
  cells.width = G;
  cells.height = G;
  const cellContext = cells.getContext("2d");
  const shade = cellContext.createImageData(G, G);
  for (let k = 0; k < G * G; k++) {
    shade.data[4 * k] = 150;
    shade.data[4 * k + 1] = 150;
    shade.data[4 * k + 2] = 150;
    shade.data[4 * k + 3] = HOLES[k] === 1 ? 110 : 0;
  }
  cellContext.putImageData(shade, 0, 0);
  context.imageSmoothingEnabled = true;
  context.drawImage(cells, 0, 0, SIDE, SIDE);
  // the prior's contours, dashed
  context.strokeStyle = "black";
  context.lineWidth = 1;
  context.setLineDash([5, 4]);
  for (const contour of META.prior_contours) {
    for (const line of contour.lines) {
      context.beginPath();
      for (let k = 0; k < line.length; k += 2) {
        const [x, y] = toPixel(line[k], line[k + 1]);
        context.lineTo(x, y);
      }
      context.stroke();
    }
  }
  context.setLineDash([]);
  // the test codes, by class
  context.globalAlpha = 0.75;
  for (let n = 0; n < N; n++) {
    const [x, y] = toPixel(CODES[2 * n], CODES[2 * n + 1]);
    context.fillStyle = COLOURS[LABELS[n] % 10];
    context.beginPath();
    context.arc(x, y, 2.5, 0, 2 * Math.PI);
    context.fill();
  }
  context.globalAlpha = 1;
  context.strokeStyle = "#888";
  context.strokeRect(0.5, 0.5, SIDE - 1, SIDE - 1);
  drawAxes(context);
}

// a tick and its value at every integer of z0 (along the bottom) and of z1 (along the left),
// but those within 25 pixels of a corner
function drawAxes(context) {
  context.fillStyle = "#444";
  context.strokeStyle = "#444";
  context.font = "11px sans-serif";
  const last = Math.floor(LIMIT - 25 / SIDE * 2 * LIMIT);
  for (let v = -last; v <= last; v++) {
    const [x, y] = toPixel(v, v);
    context.beginPath();
    context.moveTo(x, SIDE);
    context.lineTo(x, SIDE - 5);
    context.moveTo(0, y);
    context.lineTo(5, y);
    context.stroke();
    context.fillText(String(v), x - 3, SIDE - 8);
    context.fillText(String(v), 8, y + 4);
  }
  context.fillText("z0", SIDE - 20, SIDE - 20);
  context.fillText("z1", 20, 14);
}

// the code nearest to pixel (x, y) within `radius` pixels; -1 if none
function nearestCode(x, y, radius) {
  let best = -1;
  let bestDistance = radius * radius;
  for (let n = 0; n < N; n++) {
    const [cx, cy] = toPixel(CODES[2 * n], CODES[2 * n + 1]);
    const distance = (cx - x) * (cx - x) + (cy - y) * (cy - y);
    if (distance <= bestDistance) {
      best = n;
      bestDistance = distance;
    }
  }
  return best;
}

// ---- images: 28 x 28 values in [0, 1], dark ink on white as the figures draw them ----

const tile = document.createElement("canvas");
tile.width = 28;
tile.height = 28;

function drawImage(canvas, pixels, left, size, framed) {
  const tileContext = tile.getContext("2d");
  const image = tileContext.createImageData(28, 28);
  for (let j = 0; j < 784; j++) {
    const value = Math.min(Math.max(pixels[j], 0), 1);
    const grey = Math.round(255 * (1 - value));
    image.data[4 * j] = grey;
    image.data[4 * j + 1] = grey;
    image.data[4 * j + 2] = grey;
    image.data[4 * j + 3] = 255;
  }
  tileContext.putImageData(image, 0, 0);
  const context = canvas.getContext("2d");
  context.imageSmoothingEnabled = false;
  context.drawImage(tile, left, 0, size, size);
  if (framed) {
    context.strokeStyle = "red";
    context.lineWidth = 2;
    context.strokeRect(left + 1, 1, size - 2, size - 2);
  }
}

// ---- what the pointer and the clicks do ----

const pathMode = document.getElementById("path-mode");
let pointer = null;         // [z0, z1] under the pointer
let clicked = -1;           // the clicked code's index
let pathEnds = [];          // the path's ends, [z0, z1] each

function drawPlane() {
  const context = plane.getContext("2d");
  context.drawImage(background, 0, 0);
  if (clicked >= 0) {
    const [x, y] = toPixel(CODES[2 * clicked], CODES[2 * clicked + 1]);
    context.strokeStyle = "black";
    context.lineWidth = 2;
    context.beginPath();
    context.arc(x, y, 6, 0, 2 * Math.PI);
    context.stroke();
  }
  context.strokeStyle = "black";
  context.lineWidth = 2;
  const ends = pathEnds.map(z => toPixel(z[0], z[1]));
  if (ends.length === 2) {
    context.beginPath();
    context.moveTo(ends[0][0], ends[0][1]);
    context.lineTo(ends[1][0], ends[1][1]);
    context.stroke();
  }
  for (const [x, y] of ends) {
    context.strokeRect(x - 4, y - 4, 8, 8);
  }
  if (pointer !== null) {
    const [x, y] = toPixel(pointer[0], pointer[1]);
    context.beginPath();
    context.moveTo(x - 8, y);
    context.lineTo(x + 8, y);
    context.moveTo(x, y - 8);
    context.lineTo(x, y + 8);
    context.stroke();
  }
}

function showPointer(z0, z1) {
  const start = performance.now();
  const means = decode(z0, z1);
  const milliseconds = performance.now() - start;
  const decoded = document.getElementById("decoded");
  drawImage(decoded, means, 0, decoded.width, false);
  let place = "where the codes are";
  if (inHole(z0, z1)) {
    place = "in a hole of q(z)";
  }
  document.getElementById("where").textContent =
    `z = (${z0.toFixed(2)}, ${z1.toFixed(2)}), ${place}: decoded in ${milliseconds.toFixed(2)} ms`;
}

function showClicked(n) {
  const pixels = new Float64Array(784);
  for (let j = 0; j < 784; j++) {
    pixels[j] = IMAGES[784 * n + j] / 255;
  }
  drawImage(document.getElementById("test-image"), pixels, 0, 112, false);
  const means = decode(CODES[2 * n], CODES[2 * n + 1]);
  drawImage(document.getElementById("test-decoded"), means, 0, 112, false);
  const name = META.class_names[LABELS[n]];
  document.getElementById("test-caption").textContent = `test image ${n}: ${name}`;
}

// the straight path z = (1 - t) a + t b at STEPS points from t = 0 to 1 (codes.interpolate's
// linear path), decoded; the points in holes framed in red
const STEPS = 10;

function showPath() {
  const canvas = document.getElementById("path");
  const size = canvas.width / STEPS;
  const [a, b] = pathEnds;
  let holes = 0;
  for (let k = 0; k < STEPS; k++) {
    const t = k / (STEPS - 1);
    const z0 = (1 - t) * a[0] + t * b[0];
    const z1 = (1 - t) * a[1] + t * b[1];
    const hole = inHole(z0, z1);
    if (hole) {
      holes += 1;
    }
    drawImage(canvas, decode(z0, z1), k * size, size, hole);
  }
  document.getElementById("path-caption").textContent =
    `the straight path, ${STEPS} points; ${holes} in holes of q(z) (framed red)`;
}

plane.addEventListener("mousemove", event => {
  pointer = toLatent(event.offsetX, event.offsetY);
  showPointer(pointer[0], pointer[1]);
  drawPlane();
});

plane.addEventListener("click", event => {
  const n = nearestCode(event.offsetX, event.offsetY, 6);
  if (pathMode.checked) {
    let z = toLatent(event.offsetX, event.offsetY);
    if (n >= 0) {
      z = [CODES[2 * n], CODES[2 * n + 1]];         // a click near a code takes the code
    }
    if (pathEnds.length === 2) {
      pathEnds = [];
    }
    pathEnds.push(z);
    if (pathEnds.length === 2) {
      showPath();
    }
  } else if (n >= 0) {
    clicked = n;
    showClicked(n);
  }
  drawPlane();
});

function writeKey() {
  const legend = document.getElementById("legend");
  META.class_names.forEach((name, k) => {
    const entry = document.createElement("span");
    const swatch = document.createElement("i");
    swatch.style.background = COLOURS[k];
    entry.appendChild(swatch);
    entry.appendChild(document.createTextNode(name));
    legend.appendChild(entry);
  });
  const masses = META.prior_contours.map(c => `${Math.round(100 * c.mass)}%`).join(", ");
  document.getElementById("key").textContent =
    `Dots: the posterior means of the first ${N} test images. Dashed: the prior's contours ` +
    `around ${masses} of its mass (for N(0, I), the 1, 2, 3 sigma circles). Grey: the holes, ` +
    `where the mixture fitted to q(z) has a lower density than 99% of the test codes.`;
}

// For tests and scripts: the 784 means at z; where the canvas shows z; the codes; the point under
// the pointer (null before it moves).
window.vaeDecode = (z0, z1) => Array.from(decode(z0, z1));
window.vaePixel = (z0, z1) => toPixel(z0, z1);
window.vaeCodes = () => Array.from(CODES);
window.vaePointer = () => pointer;

drawBackground();
writeKey();
drawPlane();
showPointer(0, 0);
</script>
</body>
</html>
"""
