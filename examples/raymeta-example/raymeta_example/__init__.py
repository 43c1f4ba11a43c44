"""An example raymeta plugin: a meta method in a package of its own (docs/extending.md)."""
