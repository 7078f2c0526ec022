"""vfio-device-plugin: offer whole PCI devices bound to vfio-pci to Kubernetes VMs (KubeVirt, Harvester)."""

__version__ = "0.1.0"
