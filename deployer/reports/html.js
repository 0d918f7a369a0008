// report.html's script (deployer/reports/html.py): fills the device and metric selectors from the data
// embedded once as JSON, and draws the selected series into the plotly chart. Board strings are set as
// text (textContent) or, for plotly, with their HTML characters as entities, never as markup.
(function () {
  "use strict";
  performance.mark("report:script");  // bench/report_html.py: plotly.js and the page before it are done
  var D = JSON.parse(document.getElementById("report-data").textContent);
  var chart = document.getElementById("chart");
  var devicePick = document.getElementById("device");
  var metricPick = document.getElementById("metric");
  var note = document.getElementById("series-note");
  var x = D.nights.map(function (n) { return n[1] * 1000; });
  var runs = D.nights.map(function (n) { return n[0]; });
  var base = chart && chart.layout ? JSON.parse(JSON.stringify(chart.layout)) : {};

  function esc(text) {
    return String(text).replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;")
      .replace(/"/g, "&quot;");
  }

  function seriesName(s) {
    return s.step + (s.item ? " / " + s.item : "") + " \u00b7 " + s.metric;
  }

  function option(select, value, text) {
    var o = document.createElement("option");
    o.value = String(value);
    o.textContent = text;
    select.appendChild(o);
  }

  function fillMetrics(d, keep) {
    metricPick.textContent = "";
    D.devices[d].series.forEach(function (s, i) { option(metricPick, i, seriesName(s)); });
    var same = D.devices[d].series.findIndex(function (s) { return seriesName(s) === keep; });
    metricPick.value = String(same >= 0 ? same : 0);
  }

  function at(indexes, values) {
    return indexes.map(function (i) { return values[i]; });
  }

  function baselineTraces(s) {
    var traces = [];
    s.base.forEach(function (b, n) {
      var x0 = x[b[0]], x1 = x[b[1]], lo = b[2] - b[3], hi = b[2] + b[3];
      var tip = "baseline: median " + b[2] + ", IQR " + b[3] + " over " + b[4] + " night(s)";
      traces.push({x: [x0, x1, x1, x0, x0], y: [lo, lo, hi, hi, lo], type: "scatter", mode: "lines",
        fill: "toself", fillcolor: "rgba(99,110,250,0.12)", line: {width: 0}, hoverinfo: "text", text: tip,
        name: "baseline median \u00b1 IQR", legendgroup: "baseline", showlegend: n === 0});
      traces.push({x: [x0, x1], y: [b[2], b[2]], type: "scatter", mode: "lines", hoverinfo: "text", text: tip,
        line: {color: "rgba(99,110,250,0.7)", dash: "dot", width: 1}, legendgroup: "baseline",
        showlegend: false, name: "baseline median"});
    });
    return traces;
  }

  function driverChanges(dev) {
    var shapes = [], notes = [];
    dev.segments.slice(1).forEach(function (seg, n) {
      var before = dev.segments[n];
      var where = (x[before[1]] + x[seg[0]]) / 2;
      shapes.push({type: "line", xref: "x", yref: "paper", x0: where, x1: where, y0: 0, y1: 1,
        line: {color: "#d62728", width: 1.5, dash: "dash"}});
      notes.push({x: where, xref: "x", y: 1, yref: "paper", yanchor: "bottom", showarrow: false,
        text: "driver changed", font: {color: "#d62728", size: 11},
        hovertext: esc(before[2] + " \u2192 " + seg[2] + " (run " + runs[seg[0]] + ")")});
    });
    return {shapes: shapes, annotations: notes};
  }

  function draw() {
    var dev = D.devices[Number(devicePick.value)];
    var s = dev.series[Number(metricPick.value)];
    var unit = s.unit ? " (" + s.unit + ")" : "";
    var valueTip = "run %{customdata}<br>%{x|%Y-%m-%d %H:%M}<br>%{y}<extra></extra>";
    var traces = baselineTraces(s);
    traces.push({x: x, y: s.v, customdata: runs, type: "scatter", mode: "lines+markers", name: "value",
      connectgaps: false, line: {color: "#1f77b4"}, marker: {size: 5}, hovertemplate: valueTip});
    if (s.cp.length) {
      traces.push({x: at(s.cp, x), y: at(s.cp, s.v), customdata: at(s.cp, runs), type: "scatter",
        mode: "markers", name: "change point", hovertemplate: "change point, " + valueTip,
        marker: {symbol: "x-thin-open", size: 14, color: "#d62728", line: {width: 3}}});
    }
    traces.push({x: [x[D.current]], y: [s.v[D.current]], customdata: [runs[D.current]], type: "scatter",
      mode: "markers", name: "this run", hovertemplate: "this run, " + valueTip,
      marker: {symbol: "circle-open", size: 16, color: "#111", line: {width: 2}}});
    var changes = driverChanges(dev);
    var layout = Object.assign({}, base, {
      title: {text: esc(dev.name + " \u00b7 " + seriesName(s))},
      yaxis: Object.assign({}, base.yaxis, {title: {text: esc(s.metric + unit)}}),
      shapes: changes.shapes, annotations: changes.annotations});
    note.textContent = s.v.filter(function (v) { return v !== null; }).length + " of " + x.length +
      " nights; " + dev.segments.length + " fingerprint(s)";
    chart.dataset.series = JSON.stringify([dev.name, s.step, s.item, s.metric]);
    return Plotly.react(chart, traces, layout, D.config);
  }

  function pickDevice(d) {
    var keep = metricPick.selectedIndex >= 0 ? metricPick.options[metricPick.selectedIndex].textContent : "";
    devicePick.value = String(d);
    fillMetrics(d, keep);
    return draw();
  }

  if (!D.devices.length || !chart) {
    if (chart) { chart.style.display = "none"; }
    performance.mark("report:first-chart");
    return;
  }
  D.devices.forEach(function (dev, i) { option(devicePick, i, dev.name); });
  devicePick.value = String(D.selected[0]);
  fillMetrics(D.selected[0], "");
  metricPick.value = String(D.selected[1]);
  devicePick.addEventListener("change", function () { pickDevice(Number(devicePick.value)); });
  metricPick.addEventListener("change", draw);
  document.querySelectorAll("#matrix tr[data-device] a.pick").forEach(function (link) {
    link.addEventListener("click", function () {
      var name = link.closest("tr").getAttribute("data-device");
      var d = D.devices.findIndex(function (dev) { return dev.name === name; });
      if (d >= 0) { pickDevice(d); }
    });
  });
  draw().then(function () { performance.mark("report:first-chart"); });
})();
