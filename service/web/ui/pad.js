// The drawing pad: light ink on black, drawn with any pointer (mouse, touch, pen) or the keyboard. Strokes
// are kept in the model's pixel units, so that a drawing survives a change of model or screen size; the
// canvas holds about 280 pixels a side whatever its size on screen, so the same strokes give the same PNG
// on a phone and on a desktop.

const TARGET = 280;

export class Pad {
  // onChange(final): called as the drawing changes; final is true at the end of a stroke, an undo or a clear.
  constructor(canvas, cursor, onChange) {
    this.canvas = canvas;
    this.cursor = cursor;
    this.ctx = canvas.getContext("2d");
    this.onChange = onChange;
    this.strokes = [];
    this.active = null; // the stroke being drawn
    this.pointer = null; // its pointer id
    this.brush = 2.5; // stroke width in model pixels
    this.picture = null; // an uploaded image shown instead of strokes
    this.pen = { x: 0, y: 0, down: false }; // the keyboard's pen
    this.setShape(28, 28);
    canvas.addEventListener("pointerdown", (e) => this.#down(e));
    canvas.addEventListener("pointermove", (e) => this.#move(e));
    canvas.addEventListener("pointerup", (e) => this.#up(e));
    canvas.addEventListener("pointercancel", (e) => this.#up(e));
    canvas.addEventListener("keydown", (e) => this.#key(e));
    canvas.addEventListener("focus", () => this.#showCursor());
    canvas.addEventListener("blur", () => this.cursor.classList.remove("on"));
  }

  setShape(H, W) {
    this.H = H;
    this.W = W;
    this.k = Math.max(1, Math.ceil(TARGET / Math.max(H, W)));
    this.canvas.width = W * this.k;
    this.canvas.height = H * this.k;
    this.pen = { x: W / 2, y: H / 2, down: false };
    this.redraw();
  }

  isEmpty() {
    return this.strokes.length === 0 && this.active === null;
  }

  undo() {
    if (this.active) this.#finish();
    if (this.strokes.pop()) {
      this.redraw();
      this.onChange(true);
    }
  }

  clear() {
    this.active = null;
    this.strokes = [];
    this.picture = null;
    this.redraw();
    this.onChange(true);
  }

  // Show an uploaded image (scaled to fit) in place of the strokes; the next stroke starts a new drawing.
  show(bitmap) {
    this.strokes = [];
    this.active = null;
    this.picture = bitmap;
    this.redraw();
  }

  toBlob() {
    return new Promise((resolve) => this.canvas.toBlob(resolve, "image/png"));
  }

  redraw() {
    const { ctx, canvas } = this;
    ctx.fillStyle = "#000";
    ctx.fillRect(0, 0, canvas.width, canvas.height);
    if (this.picture) {
      const s = Math.min(canvas.width / this.picture.width, canvas.height / this.picture.height);
      const w = this.picture.width * s;
      const h = this.picture.height * s;
      ctx.drawImage(this.picture, (canvas.width - w) / 2, (canvas.height - h) / 2, w, h);
      return;
    }
    for (const stroke of this.strokes) this.#paint(stroke, 0);
    if (this.active) this.#paint(this.active, 0);
  }

  // Draw a stroke's points from index `from` on (the segment before it included).
  #paint(stroke, from) {
    const { ctx, k } = this;
    const pts = stroke.points;
    ctx.strokeStyle = ctx.fillStyle = "#fff";
    ctx.lineWidth = stroke.width * k;
    ctx.lineCap = ctx.lineJoin = "round";
    if (pts.length === 1) {
      ctx.beginPath();
      ctx.arc(pts[0][0] * k, pts[0][1] * k, (stroke.width * k) / 2, 0, 2 * Math.PI);
      ctx.fill();
      return;
    }
    ctx.beginPath();
    const start = Math.max(0, from - 1);
    ctx.moveTo(pts[start][0] * k, pts[start][1] * k);
    for (let i = start + 1; i < pts.length; i++) ctx.lineTo(pts[i][0] * k, pts[i][1] * k);
    ctx.stroke();
  }

  #point(e) {
    const r = this.canvas.getBoundingClientRect();
    return [((e.clientX - r.left) / r.width) * this.W, ((e.clientY - r.top) / r.height) * this.H];
  }

  #start(point) {
    if (this.picture) { // drawing after an upload starts a new drawing
      this.picture = null;
      this.redraw();
    }
    this.active = { width: this.brush, points: [point] };
    this.#paint(this.active, 0);
    this.onChange(false);
  }

  #extend(point) {
    const n = this.active.points.length;
    this.active.points.push(point);
    this.#paint(this.active, n);
    this.onChange(false);
  }

  #finish() {
    this.strokes.push(this.active);
    this.active = null;
  }

  #down(e) {
    if (this.active || (e.pointerType === "mouse" && e.button !== 0)) return;
    e.preventDefault();
    this.canvas.setPointerCapture(e.pointerId);
    this.pointer = e.pointerId;
    this.#start(this.#point(e));
  }

  #move(e) {
    if (!this.active || e.pointerId !== this.pointer) return;
    const events = e.getCoalescedEvents ? e.getCoalescedEvents() : [];
    for (const c of events.length ? events : [e]) {
      const n = this.active.points.length;
      this.active.points.push(this.#point(c));
      this.#paint(this.active, n);
    }
    this.onChange(false);
  }

  #up(e) {
    if (!this.active || e.pointerId !== this.pointer) return;
    this.pointer = null;
    this.#finish();
    this.onChange(true);
  }

  #showCursor() {
    const { cursor, pen } = this;
    cursor.classList.add("on");
    cursor.classList.toggle("down", pen.down);
    cursor.style.left = `${(pen.x / this.W) * 100}%`;
    cursor.style.top = `${(pen.y / this.H) * 100}%`;
    cursor.style.width = cursor.style.height = `${(this.brush / this.W) * 100}%`;
  }

  #key(e) {
    const pen = this.pen;
    const step = e.shiftKey ? 2 : 0.5;
    const moves = { ArrowLeft: [-step, 0], ArrowRight: [step, 0], ArrowUp: [0, -step], ArrowDown: [0, step] };
    if (e.key in moves) {
      e.preventDefault();
      const [dx, dy] = moves[e.key];
      pen.x = Math.min(this.W, Math.max(0, pen.x + dx));
      pen.y = Math.min(this.H, Math.max(0, pen.y + dy));
      if (pen.down && this.active) this.#extend([pen.x, pen.y]);
    } else if (e.key === " " || e.key === "Enter") {
      e.preventDefault();
      pen.down = !pen.down;
      if (pen.down) {
        this.#start([pen.x, pen.y]);
      } else if (this.active) {
        this.#finish();
        this.onChange(true);
      }
    } else if (e.key === "Escape" && pen.down) {
      pen.down = false;
      if (this.active) {
        this.#finish();
        this.onChange(true);
      }
    } else if ((e.ctrlKey || e.metaKey) && e.key.toLowerCase() === "z") {
      e.preventDefault();
      pen.down = false;
      this.undo();
    } else {
      return;
    }
    this.#showCursor();
  }
}
