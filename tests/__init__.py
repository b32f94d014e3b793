"""Tests for twisted_postcopy."""
