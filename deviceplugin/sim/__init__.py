"""Simulators shared by `demo`, the tests and the benchmarks; never used by the product code.

`node` lays out fake sysfs and /dev trees that the real readers scan; `kubelet` is a test kubelet that
speaks the real device-plugin protocol over real unix sockets. Each stands in for one outside party.
"""
