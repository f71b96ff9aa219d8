/* slidepipe slide viewer: OpenSeadragon showing the slide's Deep Zoom pyramid with the
 * heatmap as a second layer, offline from file://.
 *
 * World (viewport) coordinates are level-0 slide pixels: the slide image is placed
 * data.slide.width level-0 pixels wide at (0, 0) and the heatmap raster
 * (data.heatmap.width x data.heatmap.downsample) too, so top-patch rectangles given in level-0
 * pixels are viewport rectangles as they are.
 *
 * The heatmap arrives as a grey + alpha PNG data URL (grey = round(score x 255), alpha 0 = no
 * data). This script colours it with the colormap table, keeps only scores at or above the
 * threshold and outlines those regions; the coloured canvas is the single tile of a custom
 * tile source, re-coloured through OpenSeadragon's tile invalidation when the threshold
 * changes. Opacity and visibility are the layer's (TiledImage) opacity. */
(function () {
  "use strict";

  const data = JSON.parse(document.getElementById("slide-data").textContent);
  const heat = data.heatmap;
  const OUTLINE_RGB = [0, 0, 0];
  /* The coloured layer is upscaled (nearest neighbour) to about this many pixels on its long
   * side so that outlines stay thin next to the raster's cells. */
  const LAYER_SIDE = 2048;

  /** Scores (0-255) and validity of the heatmap raster, decoded from its PNG. */
  function decodeRaster(image) {
    const canvas = document.createElement("canvas");
    canvas.width = image.naturalWidth;
    canvas.height = image.naturalHeight;
    const context = canvas.getContext("2d", {willReadFrequently: true});
    context.drawImage(image, 0, 0);
    const pixels = context.getImageData(0, 0, canvas.width, canvas.height).data;
    const count = canvas.width * canvas.height;
    const scores = new Uint8Array(count);
    const valid = new Uint8Array(count);
    for (let i = 0; i < count; i++) {
      scores[i] = pixels[4 * i];
      valid[i] = pixels[4 * i + 3] > 0 ? 1 : 0;
    }
    return {width: canvas.width, height: canvas.height, scores, valid};
  }

  /** The coloured, thresholded and outlined heatmap on a canvas of its own. */
  class HeatmapLayer {
    constructor(raster, lut) {
      this.raster = raster;
      this.lut = lut;
      this.scale = Math.max(1, Math.floor(LAYER_SIDE / Math.max(raster.width, raster.height)));
      this.canvas = document.createElement("canvas");
      this.canvas.width = raster.width * this.scale;
      this.canvas.height = raster.height * this.scale;
      this.context = this.canvas.getContext("2d", {willReadFrequently: true});
      this.threshold = 0;
      this.visiblePixels = 0;
    }

    /** Colour every cell scoring at or above `threshold`; outline the shown regions. */
    render(threshold) {
      const {width, height, scores, valid} = this.raster;
      const k = this.scale;
      const minimum = Math.ceil(threshold * 255 - 1e-6);
      const shown = new Uint8Array(width * height);
      for (let i = 0; i < shown.length; i++) {
        shown[i] = valid[i] && scores[i] >= minimum ? 1 : 0;
      }
      const isShown = (x, y) => x >= 0 && y >= 0 && x < width && y < height && shown[y * width + x] === 1;
      const outline = Math.max(1, Math.floor(k / 6));
      const out = this.context.createImageData(this.canvas.width, this.canvas.height);
      const pixels = out.data;
      let visible = 0;
      for (let y = 0; y < height; y++) {
        for (let x = 0; x < width; x++) {
          if (!shown[y * width + x]) continue;
          const colour = this.lut[scores[y * width + x]];
          const left = !isShown(x - 1, y), right = !isShown(x + 1, y);
          const top = !isShown(x, y - 1), bottom = !isShown(x, y + 1);
          for (let dy = 0; dy < k; dy++) {
            const edgeY = (top && dy < outline) || (bottom && dy >= k - outline);
            let offset = 4 * ((y * k + dy) * this.canvas.width + x * k);
            for (let dx = 0; dx < k; dx++, offset += 4) {
              const edge = edgeY || (left && dx < outline) || (right && dx >= k - outline);
              const rgb = edge ? OUTLINE_RGB : colour;
              pixels[offset] = rgb[0];
              pixels[offset + 1] = rgb[1];
              pixels[offset + 2] = rgb[2];
              pixels[offset + 3] = 255;
            }
          }
          visible++;
        }
      }
      this.context.putImageData(out, 0, 0);
      this.threshold = threshold;
      this.visiblePixels = visible;  // raster cells shown
    }

    /** A new 2D context holding the layer scaled by `scale` (OpenSeadragon keeps it). */
    contextAt(scale) {
      const canvas = document.createElement("canvas");
      canvas.width = Math.max(1, Math.ceil(this.canvas.width * scale));
      canvas.height = Math.max(1, Math.ceil(this.canvas.height * scale));
      const context = canvas.getContext("2d");
      context.imageSmoothingEnabled = scale < 1;
      context.drawImage(this.canvas, 0, 0, canvas.width, canvas.height);
      return context;
    }
  }

  /** A tile source of one tile per level: the heatmap layer at that level's scale. */
  class HeatmapTileSource extends OpenSeadragon.TileSource {
    constructor(layer) {
      const {width, height} = layer.canvas;
      super({width, height, tileSize: Math.max(width, height), tileOverlap: 0});
      this.layer = layer;
    }

    getTileUrl(level, x, y) {
      return "slidepipe-heatmap/" + level + "/" + x + "_" + y;
    }

    downloadTileStart(job) {
      job.finish(this.layer.contextAt(this.getLevelScale(job.tile.level)), null, "context2d");
    }

    downloadTileAbort() {
      // tiles are made in memory at once; nothing to abort
    }
  }

  function drawLegend(lut) {
    const canvas = document.getElementById("legend-bar");
    const context = canvas.getContext("2d");
    for (let i = 0; i < 256; i++) {
      context.fillStyle = "rgb(" + lut[i].join(",") + ")";
      context.fillRect(i, 0, 1, canvas.height);
    }
  }

  function formatScore(value) {
    return Number(value).toFixed(2);
  }

  const viewer = OpenSeadragon({
    id: "viewer",
    prefixUrl: "../../assets/openseadragon/images/",
    // The canvas drawer draws file:// tiles; WebGL cannot upload such cross-origin images.
    drawer: "canvas",
    showNavigator: true,
    navigatorPosition: "BOTTOM_RIGHT",
    showRotationControl: false,
    maxZoomPixelRatio: 4,
    visibilityRatio: 0.5,
    tileSources: [{tileSource: data.slide.dzi, x: 0, y: 0, width: data.slide.width}],
  });

  const controls = {
    visible: document.getElementById("heatmap-visible"),
    opacity: document.getElementById("heatmap-opacity"),
    opacityValue: document.getElementById("heatmap-opacity-value"),
    threshold: document.getElementById("heatmap-threshold"),
    thresholdValue: document.getElementById("heatmap-threshold-value"),
  };
  controls.opacity.value = heat.opacity;
  controls.threshold.value = heat.threshold;
  controls.opacityValue.value = formatScore(heat.opacity);
  controls.thresholdValue.value = formatScore(heat.threshold);
  drawLegend(heat.lut);

  const state = {layer: null, item: null};
  window.slidepipe = {viewer, state};

  function applyOpacity() {
    controls.opacityValue.value = formatScore(controls.opacity.value);
    if (state.item) {
      state.item.setOpacity(controls.visible.checked ? Number(controls.opacity.value) : 0);
    }
  }

  let frameRequested = false;
  function applyThreshold() {
    controls.thresholdValue.value = formatScore(controls.threshold.value);
    if (!state.item || frameRequested) return;  // a new layer reads the slider itself
    frameRequested = true;
    window.requestAnimationFrame(() => {
      frameRequested = false;
      state.layer.render(Number(controls.threshold.value));
      state.item.requestInvalidate();
    });
  }

  controls.visible.addEventListener("change", applyOpacity);
  controls.opacity.addEventListener("input", applyOpacity);
  controls.threshold.addEventListener("input", applyThreshold);

  viewer.addHandler("tile-invalidated", event => {
    const source = event.tiledImage.source;
    if (!(source instanceof HeatmapTileSource)) return undefined;
    return event.setData(source.layer.contextAt(source.getLevelScale(event.tile.level)), "context2d");
  });

  function addHeatmap() {
    const image = new Image();
    image.onload = () => {
      const layer = new HeatmapLayer(decodeRaster(image), heat.lut);
      layer.render(Number(controls.threshold.value));
      state.layer = layer;
      viewer.addTiledImage({
        tileSource: new HeatmapTileSource(layer),
        x: 0,
        y: 0,
        width: heat.width * heat.downsample,
        opacity: controls.visible.checked ? Number(controls.opacity.value) : 0,
        success: event => {
          state.item = event.item;
          if (layer.threshold !== Number(controls.threshold.value)) applyThreshold();
          document.body.dataset.viewerReady = "true";
        },
        error: event => console.error("heatmap layer failed: " + event.message),
      });
    };
    image.onerror = () => console.error("the heatmap image of this page cannot be decoded");
    image.src = heat.png;
  }

  let highlight = null;
  function showPatch(patch, button) {
    const rect = new OpenSeadragon.Rect(patch.x, patch.y, patch.size, patch.size);
    viewer.viewport.fitBounds(new OpenSeadragon.Rect(patch.x - patch.size, patch.y - patch.size,
                                                     3 * patch.size, 3 * patch.size));
    if (highlight === null) {
      highlight = document.createElement("div");
      highlight.className = "patch-box";
      viewer.addOverlay({element: highlight, location: rect});
    } else {
      viewer.updateOverlay(highlight, rect);
    }
    document.querySelectorAll("#top-patch-list button").forEach(b => b.setAttribute("aria-pressed", "false"));
    button.setAttribute("aria-pressed", "true");
  }

  function listTopPatches() {
    const list = document.getElementById("top-patch-list");
    for (const patch of data.topPatches) {
      const item = document.createElement("li");
      const button = document.createElement("button");
      button.type = "button";
      button.dataset.rank = patch.rank;
      button.setAttribute("aria-pressed", "false");
      button.textContent = "#" + patch.rank + " · score " + formatScore(patch.score) +
        " · (" + patch.x + ", " + patch.y + ")";
      button.addEventListener("click", () => showPatch(patch, button));
      item.appendChild(button);
      list.appendChild(item);
    }
    if (!data.topPatches.length) {
      const item = document.createElement("li");
      item.textContent = "none listed";
      list.appendChild(item);
    }
  }

  viewer.addOnceHandler("open", addHeatmap);
  viewer.addHandler("open-failed", event => console.error("slide image failed: " + event.message));
  listTopPatches();
}());
