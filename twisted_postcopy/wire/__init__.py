"""wire subpackage of twisted_postcopy."""
