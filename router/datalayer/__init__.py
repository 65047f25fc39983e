"""The router's data layer: collectors that refresh instance views and publish snapshots.

Scheduling never does I/O: it reads the immutable `FleetSnapshot`s published here.
"""
