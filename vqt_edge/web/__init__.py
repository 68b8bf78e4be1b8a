"""The browser front end: a static site that adapts a bundle in a tab (docs/browser.md)."""
