/* revisit's change map: locations coloured by r, AOI outlines, a graticule, and a
 * plot of a location's history of R and r on click. Works offline: no tiles unless
 * the user turns on the OpenStreetMap layer. Data comes from this server's /api.
 *
 * For tests and scripts the page exposes window.revisitMap (drawn, state,
 * openHistory(id)) and mirrors its state on <body data-state data-locations
 * data-history>.
 */
(function () {
  "use strict";

  // Rows per /api/changes request, and the most locations drawn for one view.
  var PAGE_SIZE = 5000;
  var MAX_DRAWN = 50000;
  // r is coloured on this range (clamped); about 1 means as much change as usual.
  var R_MIN = 0.5;
  var R_MAX = 2.5;
  // viridis: perceptually even and readable with colour-vision deficiencies.
  var RAMP = ["#440154", "#3b528b", "#21918c", "#5ec962", "#fde725"];
  var AOI_COLOUR = "#7a3e9d";
  var SVG_NS = "http://www.w3.org/2000/svg";

  var state = {
    map: null,
    drawn: 0,
    state: "loading",
    truncated: false,
    historyShown: null,
    lastError: null,
    openHistory: openHistory,
  };
  window.revisitMap = state;

  var body = document.body;
  var statusLine = document.getElementById("status");
  var changedOnly = document.getElementById("changed-only");

  // -- helpers ------------------------------------------------------------------------

  function esc(text) {
    return String(text).replace(/[&<>"']/g, function (c) {
      return { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c];
    });
  }

  function setState(name, message, isError) {
    state.state = name;
    body.dataset.state = name;
    if (message !== undefined) {
      statusLine.textContent = message;
      statusLine.classList.toggle("error", Boolean(isError));
    }
  }

  function fail(error) {
    state.lastError = String(error && error.message ? error.message : error);
    setState("error", state.lastError, true);
  }

  function getJSON(url, signal) {
    return fetch(url, { signal: signal, headers: { Accept: "application/json" } }).then(
      function (reply) {
        return reply.text().then(function (text) {
          var value = null;
          try {
            value = JSON.parse(text);
          } catch (e) {
            value = null;
          }
          if (!reply.ok) {
            var why = value && value.error ? value.error : text.slice(0, 200);
            throw new Error(url.split("?")[0] + ": " + reply.status + " " + why);
          }
          return value;
        });
      }
    );
  }

  function hexToRgb(hex) {
    var n = parseInt(hex.slice(1), 16);
    return [(n >> 16) & 255, (n >> 8) & 255, n & 255];
  }
  var RAMP_RGB = RAMP.map(hexToRgb);

  function colourOf(r) {
    if (r === null || r === undefined || !isFinite(r)) return "#9aa0a6";
    var t = Math.min(1, Math.max(0, (r - R_MIN) / (R_MAX - R_MIN))) * (RAMP.length - 1);
    var i = Math.min(RAMP.length - 2, Math.floor(t));
    var f = t - i;
    var a = RAMP_RGB[i];
    var b = RAMP_RGB[i + 1];
    var c = [0, 1, 2].map(function (k) {
      return Math.round(a[k] + (b[k] - a[k]) * f);
    });
    return "rgb(" + c.join(",") + ")";
  }

  function fmt(value, digits) {
    return value === null || value === undefined ? "–" : Number(value).toFixed(digits);
  }

  function day(iso) {
    return iso ? iso.slice(0, 10) : "–";
  }

  function clamp(v, lo, hi) {
    return Math.min(hi, Math.max(lo, v));
  }

  // -- legend -------------------------------------------------------------------------

  function drawLegend() {
    var ramp = document.getElementById("ramp");
    ramp.style.background = "linear-gradient(to right, " + RAMP.join(", ") + ")";
    var ticks = document.getElementById("ticks");
    [0.5, 1, 1.5, 2, 2.5].forEach(function (v) {
      var tick = document.createElement("span");
      tick.textContent = v >= R_MAX ? "≥ " + v : v <= R_MIN ? "≤ " + v : String(v);
      if (v <= R_MIN) tick.className = "first";
      else if (v >= R_MAX) tick.className = "last";
      else tick.style.left = (100 * (v - R_MIN)) / (R_MAX - R_MIN) + "%";
      ticks.appendChild(tick);
    });
  }

  // -- graticule ----------------------------------------------------------------------

  var STEPS = [90, 45, 30, 20, 10, 5, 2, 1, 0.5, 0.25, 0.1, 0.05, 0.025, 0.01, 0.005,
    0.0025, 0.001, 0.0005, 0.00025, 0.0001];

  function stepFor(span) {
    for (var i = 0; i < STEPS.length; i++) {
      if (span / STEPS[i] >= 4) return STEPS[i];
    }
    return STEPS[STEPS.length - 1];
  }

  function decimalsOf(step) {
    var text = String(step);
    return text.indexOf(".") < 0 ? 0 : text.length - text.indexOf(".") - 1;
  }

  function degrees(value, step, positive, negative) {
    var d = decimalsOf(step);
    var v = Number(value.toFixed(d));
    var hemi = v > 0 ? positive : v < 0 ? negative : "";
    return Math.abs(v).toFixed(d) + "°" + hemi;
  }

  var graticule = L.layerGroup();

  function drawGraticule() {
    var map = state.map;
    graticule.clearLayers();
    var b = map.getBounds();
    var west = clamp(b.getWest(), -180, 180);
    var east = clamp(b.getEast(), -180, 180);
    var south = clamp(b.getSouth(), -85.06, 85.06);
    var north = clamp(b.getNorth(), -85.06, 85.06);
    if (!(west < east && south < north)) return;
    var lonStep = stepFor(east - west);
    var latStep = stepFor(north - south);
    var size = map.getSize();
    var line = { color: "#8d949b", weight: 0.7, opacity: 0.8, interactive: false };
    var i;
    for (i = Math.ceil(west / lonStep); i * lonStep <= east; i++) {
      var lon = i * lonStep;
      graticule.addLayer(L.polyline([[south, lon], [north, lon]], line));
      // Labels along the top edge, clear of the zoom and layer controls.
      var x = map.latLngToContainerPoint([north, lon]).x;
      if (x < 70 || x > size.x - 80) continue;
      var top = map.containerPointToLatLng([x, 6]);
      graticule.addLayer(
        L.marker([top.lat, lon], {
          interactive: false,
          keyboard: false,
          icon: L.divIcon({
            className: "graticule-label lon",
            html: esc(degrees(lon, lonStep, "E", "W")),
            iconSize: [70, 12],
            iconAnchor: [35, 0],
          }),
        })
      );
    }
    for (i = Math.ceil(south / latStep); i * latStep <= north; i++) {
      var lat = i * latStep;
      graticule.addLayer(L.polyline([[lat, west], [lat, east]], line));
      // Labels along the left edge, clear of the zoom control and the scale bar.
      var y = map.latLngToContainerPoint([lat, west]).y;
      if (y < 90 || y > size.y - 40) continue;
      var left = map.containerPointToLatLng([4, y]);
      graticule.addLayer(
        L.marker([lat, left.lng], {
          interactive: false,
          keyboard: false,
          icon: L.divIcon({
            className: "graticule-label lat",
            html: esc(degrees(lat, latStep, "N", "S")),
            iconSize: [70, 12],
            iconAnchor: [0, 12],
          }),
        })
      );
    }
  }

  // -- AOIs ---------------------------------------------------------------------------

  var aoiLayer = L.geoJSON(null, {
    style: function () {
      return {
        color: AOI_COLOUR,
        weight: 2,
        fill: true,
        fillOpacity: 0.04,
        interactive: false,
      };
    },
  });
  // Each AOI's name, just above its north-west corner, where it hides no location.
  var aoiLabels = L.layerGroup();

  function drawAois(collection) {
    aoiLayer.clearLayers();
    aoiLabels.clearLayers();
    aoiLayer.addData(collection);
    var list = document.getElementById("aoi-list");
    list.textContent = "";
    if (!collection.features.length) {
      var none = document.createElement("li");
      none.textContent = "none yet (add one with `revisit aoi add`)";
      list.appendChild(none);
    }
    aoiLayer.eachLayer(function (layer) {
      var p = layer.feature.properties;
      aoiLabels.addLayer(
        L.marker(layer.getBounds().getNorthWest(), {
          interactive: false,
          keyboard: false,
          icon: L.divIcon({
            className: "aoi-label",
            html: esc(p.name),
            iconSize: null,
            iconAnchor: [0, 20],
          }),
        })
      );
      var item = document.createElement("li");
      var link = document.createElement("a");
      link.textContent = p.name;
      link.addEventListener("click", function () {
        state.map.fitBounds(layer.getBounds(), { padding: [20, 20] });
      });
      var counts = document.createElement("span");
      counts.className = "counts";
      counts.textContent =
        " " + p.locations + " measured, " + p.changed + " changed" +
        (p.mean_ratio === null ? "" : ", mean r " + fmt(p.mean_ratio, 2));
      item.appendChild(link);
      item.appendChild(counts);
      list.appendChild(item);
    });
  }

  // -- locations ----------------------------------------------------------------------

  var locations = L.layerGroup();
  var drawnLayer = null;
  var loadSeq = 0;
  var loading = null;

  function tooltipOf(p) {
    return (
      "location " + p.location_id + "<br>r " + fmt(p.ratio_ema, 3) + ", R " +
      fmt(p.ratio_last, 3) + (p.changed ? "<br><b>changed</b> since " + esc(day(p.changed_since)) : "")
    );
  }

  function markerOf(feature) {
    var p = feature.properties;
    var c = feature.geometry.coordinates;
    var marker = L.circleMarker([c[1], c[0]], {
      radius: p.changed ? 7 : 5,
      fillColor: colourOf(p.ratio_ema),
      fillOpacity: 0.9,
      color: p.changed ? "#000" : "#3d4349",
      weight: p.changed ? 3 : 0.8,
    });
    marker.bindTooltip(function () {
      return tooltipOf(p);
    });
    marker.on("click", function () {
      openHistory(p.location_id);
    });
    return marker;
  }

  function viewBbox() {
    var b = state.map.getBounds().pad(0.05);
    var box = [
      clamp(b.getWest(), -180, 180),
      clamp(b.getSouth(), -90, 90),
      clamp(b.getEast(), -180, 180),
      clamp(b.getNorth(), -90, 90),
    ];
    return box[0] < box[2] && box[1] < box[3] ? box : null;
  }

  function loadLocations() {
    var seq = ++loadSeq;
    if (loading) loading.abort();
    loading = new AbortController();
    var signal = loading.signal;
    var box = viewBbox();
    var layer = L.layerGroup();
    var count = 0;
    state.truncated = false;
    setState("loading", "loading locations…");
    if (box === null) {
      return Promise.resolve(finish());
    }
    var params = new URLSearchParams({
      bbox: box.map(function (v) { return v.toFixed(6); }).join(","),
      changed_only: changedOnly.checked ? "true" : "false",
      limit: String(PAGE_SIZE),
    });

    function finish() {
      if (seq !== loadSeq) return;
      locations.addLayer(layer);
      if (drawnLayer) locations.removeLayer(drawnLayer);
      drawnLayer = layer;
      state.drawn = count;
      body.dataset.locations = String(count);
      var what = changedOnly.checked ? " changed" : "";
      var message = count + what + " location" + (count === 1 ? "" : "s") + " in view";
      if (state.truncated) message += " (the first " + count + "; zoom in for the rest)";
      if (count === 0) message += changedOnly.checked ? "" : " with a change estimate";
      setState("ready", message);
    }

    function page(url) {
      return getJSON(url, signal).then(function (reply) {
        if (seq !== loadSeq) return;
        reply.features.forEach(function (f) {
          layer.addLayer(markerOf(f));
          count++;
        });
        if (reply.next && count >= MAX_DRAWN) {
          state.truncated = true;
        } else if (reply.next) {
          statusLine.textContent = "loading locations… " + count;
          return page("api/changes?" + reply.next.split("?")[1]);
        }
        finish();
      });
    }

    return page("api/changes?" + params.toString()).catch(function (error) {
      if (error && error.name === "AbortError") return;
      fail(error);
    });
  }

  // -- history ------------------------------------------------------------------------

  var lastHistory = null;

  function openHistory(id) {
    body.dataset.history = "";
    return getJSON("api/locations/" + encodeURIComponent(id) + "/history")
      .then(function (reply) {
        lastHistory = reply;
        showHistory(reply);
        select(reply);
        state.historyShown = reply.location_id;
        body.dataset.history = String(reply.location_id);
        return reply;
      })
      .catch(fail);
  }

  // A ring around the location whose history is shown.
  var selection = L.circleMarker([0, 0], {
    radius: 12, color: "#e8590c", weight: 3, fill: false, interactive: false,
  });

  function select(h) {
    selection.setLatLng([h.lat, h.lon]);
    if (!state.map.hasLayer(selection)) selection.addTo(state.map);
  }

  function fact(list, term, value) {
    var dt = document.createElement("dt");
    dt.textContent = term;
    var dd = document.createElement("dd");
    dd.textContent = value;
    list.appendChild(dt);
    list.appendChild(dd);
  }

  function showHistory(h) {
    document.getElementById("history").hidden = false;
    document.getElementById("history-title").textContent = "Location " + h.location_id;
    var facts = document.getElementById("history-facts");
    facts.textContent = "";
    fact(facts, "where", degrees(h.lat, 0.00001, "N", "S") + ", " + degrees(h.lon, 0.00001, "E", "W"));
    if (h.aoi_name) fact(facts, "AOI", h.aoi_name);
    var e = h.estimate;
    if (e) {
      fact(facts, "r (ratio_ema)", fmt(e.ratio_ema, 3));
      fact(facts, "R, last", fmt(e.ratio_last, 3));
      fact(facts, "changed", e.changed ? "yes, since " + day(e.changed_since) : "no");
      fact(facts, "P(changed)", fmt(e.change_probability, 3));
      fact(facts, "updates", String(e.updates));
      fact(facts, "updated", e.updated_at ? e.updated_at.slice(0, 16).replace("T", " ") : "–");
    } else {
      fact(facts, "estimate", "none: " + (h.unmeasured_reason || "not measured yet"));
    }
    drawPlot(h);
  }

  function niceTicks(lo, hi, n) {
    var span = hi - lo || Math.abs(hi) || 1;
    var raw = span / n;
    var mag = Math.pow(10, Math.floor(Math.log10(raw)));
    var step = [1, 2, 5, 10].map(function (m) { return m * mag; }).find(function (s) {
      return s >= raw;
    });
    var ticks = [];
    for (var v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) {
      ticks.push(Number(v.toPrecision(12)));
    }
    return ticks;
  }

  function svg(name, attrs, parent) {
    var el = document.createElementNS(SVG_NS, name);
    Object.keys(attrs).forEach(function (k) { el.setAttribute(k, attrs[k]); });
    if (parent) parent.appendChild(el);
    return el;
  }

  function xAxisMode() {
    var checked = document.querySelector('input[name="x-axis"]:checked');
    return checked ? checked.value : "step";
  }

  function drawPlot(h) {
    var plot = document.getElementById("plot");
    plot.textContent = "";
    var byTime = xAxisMode() === "time";
    var points = h.history.map(function (ev) {
      var when = ev.query_acquired_at || ev.created_at;
      return { x: byTime ? Date.parse(when) : ev.step, R: ev.ratio, r: ev.ratio_ema };
    }).filter(function (p) { return isFinite(p.x); });
    if (!points.length) {
      var empty = document.createElement("p");
      empty.className = "empty";
      empty.textContent = "no measurement of R yet";
      plot.appendChild(empty);
      return;
    }
    var W = 310, H = 190, L0 = 40, R0 = 8, T0 = 8, B0 = 30;
    var xs = points.map(function (p) { return p.x; });
    var ys = [1];
    points.forEach(function (p) {
      if (p.R !== null) ys.push(p.R);
      if (p.r !== null) ys.push(p.r);
    });
    var xlo = Math.min.apply(null, xs), xhi = Math.max.apply(null, xs);
    if (xlo === xhi) { xlo -= byTime ? 86400e3 : 1; xhi += byTime ? 86400e3 : 1; }
    var xpad = (xhi - xlo) * 0.04;
    xlo -= xpad;
    xhi += xpad;
    var ylo = Math.min.apply(null, ys), yhi = Math.max.apply(null, ys);
    var pad = (yhi - ylo) * 0.08 || 0.1;
    ylo = Math.max(0, ylo - pad);
    yhi += pad;
    function X(v) { return L0 + ((v - xlo) / (xhi - xlo)) * (W - L0 - R0); }
    function Y(v) { return H - B0 - ((v - ylo) / (yhi - ylo)) * (H - T0 - B0); }

    var root = svg("svg", { viewBox: "0 0 " + W + " " + H, role: "img",
      "aria-label": "R and r of location " + h.location_id, "data-points": points.length });
    var axes = svg("g", { "font-size": "10", fill: "#3d4349" }, root);
    niceTicks(ylo, yhi, 4).forEach(function (v) {
      svg("line", { x1: L0, x2: W - R0, y1: Y(v), y2: Y(v), stroke: "#e6e9ec" }, axes);
      svg("text", { x: L0 - 4, y: Y(v) + 3, "text-anchor": "end" }, axes).textContent = String(v);
    });
    var xticks;
    if (byTime) {
      var days = (xhi - xlo) / 86400e3;
      xticks = niceTicks(0, days, 3).map(function (d) { return xlo + d * 86400e3; });
    } else {
      xticks = niceTicks(xlo, xhi, 4).filter(function (v) { return Math.round(v) === v; });
    }
    xticks.forEach(function (v) {
      if (v < xlo || v > xhi) return;
      svg("line", { x1: X(v), x2: X(v), y1: H - B0, y2: H - B0 + 4, stroke: "#3d4349" }, axes);
      var label = byTime ? new Date(v).toISOString().slice(0, 10) : String(v);
      svg("text", { x: X(v), y: H - B0 + 15, "text-anchor": "middle" }, axes).textContent = label;
    });
    svg("text", { x: (L0 + W - R0) / 2, y: H - 3, "text-anchor": "middle" }, axes).textContent =
      byTime ? "date of the image (t0)" : "learner step";
    svg("line", { x1: L0, x2: L0, y1: T0, y2: H - B0, stroke: "#3d4349" }, axes);
    svg("line", { x1: L0, x2: W - R0, y1: H - B0, y2: H - B0, stroke: "#3d4349" }, axes);
    // r = 1: as much change as is usual.
    svg("line", { x1: L0, x2: W - R0, y1: Y(1), y2: Y(1), stroke: "#8a9096",
      "stroke-dasharray": "4 3" }, root);
    if (byTime && h.estimate && h.estimate.changed_since) {
      var since = Date.parse(h.estimate.changed_since);
      if (since >= xlo && since <= xhi) {
        svg("line", { x1: X(since), x2: X(since), y1: T0, y2: H - B0, stroke: "#000",
          "stroke-width": 1.5 }, root);
      }
    }
    var sorted = points.slice().sort(function (a, b) { return a.x - b.x; });
    var R = sorted.filter(function (p) { return p.R !== null; });
    svg("polyline", { fill: "none", stroke: "#d95f02", "stroke-width": 1,
      "stroke-dasharray": "2 2", points: R.map(function (p) { return X(p.x) + "," + Y(p.R); }).join(" ")
    }, root);
    R.forEach(function (p) {
      svg("circle", { cx: X(p.x), cy: Y(p.R), r: 2.2, fill: "#d95f02", class: "R" }, root);
    });
    var r = sorted.filter(function (p) { return p.r !== null; });
    svg("polyline", { fill: "none", stroke: "#1b6ca8", "stroke-width": 2.5, class: "r",
      points: r.map(function (p) { return X(p.x) + "," + Y(p.r); }).join(" ") }, root);
    plot.appendChild(root);
  }

  // -- start --------------------------------------------------------------------------

  function start() {
    drawLegend();
    var map = L.map("map", { preferCanvas: true, minZoom: 2, worldCopyJump: true });
    state.map = map;
    var none = L.layerGroup();
    var osm = L.tileLayer("https://tile.openstreetmap.org/{z}/{x}/{y}.png", {
      maxZoom: 19,
      attribution: "&copy; OpenStreetMap contributors",
    });
    none.addTo(map);
    L.control
      .layers(
        { "No tiles (offline)": none, "OpenStreetMap (needs the internet)": osm },
        { Graticule: graticule, AOIs: aoiLayer, "AOI names": aoiLabels, Locations: locations },
        { collapsed: true }
      )
      .addTo(map);
    L.control.scale({ imperial: false }).addTo(map);
    graticule.addTo(map);
    aoiLayer.addTo(map);
    aoiLabels.addTo(map);
    locations.addTo(map);
    map.setView([20, 0], 2);

    changedOnly.addEventListener("change", loadLocations);
    document.querySelectorAll('input[name="x-axis"]').forEach(function (input) {
      input.addEventListener("change", function () {
        if (lastHistory) drawPlot(lastHistory);
      });
    });

    getJSON("api/aois")
      .then(function (aois) {
        drawAois(aois);
        var bounds = L.latLngBounds([]);
        if (aoiLayer.getLayers().length) bounds.extend(aoiLayer.getBounds());
        var lb = aois.locations_bbox;
        if (lb) bounds.extend(L.latLngBounds([lb[1], lb[0]], [lb[3], lb[2]]));
        if (bounds.isValid()) map.fitBounds(bounds, { padding: [24, 24], maxZoom: 15, animate: false });
        drawGraticule();
        var timer = null;
        map.on("moveend", function () {
          drawGraticule();
          clearTimeout(timer);
          timer = setTimeout(loadLocations, 150);
        });
        return loadLocations();
      })
      .catch(fail);
  }

  start();
})();
