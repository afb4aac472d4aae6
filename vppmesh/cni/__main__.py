"""`python -m vppmesh.cni`: the plugin, as the `vppmesh-cni` console script runs it."""

from vppmesh.cni import main

main()
