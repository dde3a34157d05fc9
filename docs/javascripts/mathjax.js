// MathJax typesets the formulas that pymdownx.arithmatex marks (class "arithmatex"), on every page load
// (mkdocs-material's instant navigation included). Without network access the TeX source shows instead.
window.MathJax = {
  tex: { inlineMath: [["\\(", "\\)"]], displayMath: [["\\[", "\\]"]], processEscapes: true, processEnvironments: true },
  options: { ignoreHtmlClass: ".*|", processHtmlClass: "arithmatex" },
};
document$.subscribe(() => {
  if (window.MathJax && MathJax.typesetPromise) {
    MathJax.typesetPromise();
  }
});
