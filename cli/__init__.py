"""Command-line entry points (`featcache`, `lt-cls`); the only package that imports click."""
