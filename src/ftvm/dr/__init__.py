"""Asynchronous disaster recovery: recovery points shipped to another pool."""
