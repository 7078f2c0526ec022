"""Generated gRPC/protobuf code for the kubelet APIs this plugin speaks (see proto/); never edited by hand."""
