"""Dataset uploads: validation, nothing stored on error, delete protection."""
import grpc
import pytest

from server_harness import make_rows, tsv_bytes


def stored_files(server):
    root = server.data_dir / "datasets"
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


def test_malformed_dataset_rejected_with_line_numbers(pb, server, client):
    good = tsv_bytes(make_rows(6)).decode().splitlines()
    # Line 3 has no label column, line 6 an empty label (extra columns are
    # allowed: GLUE files carry ids and scores the mapping does not read).
    good[2] = "only text here"
    good[5] = good[5].rsplit("\t", 1)[0] + "\t"
    data = ("\n".join(good) + "\n").encode()
    with pytest.raises(grpc.RpcError) as e:
        client.upload("broken", data)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = e.value.details()
    assert "3" in details and "6" in details, details
    assert "line" in details.lower()
    listed = client.datasets.ListDatasets(pb.datasets_pb2.ListDatasetsRequest()).datasets
    assert len(listed) == 0
    assert stored_files(server) == []


def test_upload_get_list_delete(pb, server, client):
    d = pb.datasets_pb2
    ds = client.upload("s", tsv_bytes(make_rows(10)), chunk=7)
    got = client.datasets.GetDataset(d.GetDatasetRequest(dataset_id=ds.id)).dataset
    assert got.sha256 == ds.sha256 and got.num_rows == 10
    assert len(stored_files(server)) == 1
    client.datasets.DeleteDataset(d.DeleteDatasetRequest(dataset_id=ds.id))
    assert stored_files(server) == []
    with pytest.raises(grpc.RpcError) as e:
        client.datasets.GetDataset(d.GetDatasetRequest(dataset_id=ds.id))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_dataset_used_by_a_job_cannot_be_deleted(pb, client):
    d = pb.datasets_pb2
    ds = client.upload("s", tsv_bytes(make_rows(16)))
    job = client.create_job("f", "T", ds.id, steps=3)
    with pytest.raises(grpc.RpcError) as e:
        client.datasets.DeleteDataset(d.DeleteDatasetRequest(dataset_id=ds.id))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert job.id in e.value.details()


def test_upload_without_header_is_invalid(pb, client):
    d = pb.datasets_pb2
    with pytest.raises(grpc.RpcError) as e:
        client.datasets.UploadDataset(iter([d.UploadDatasetRequest(chunk=b"x\t1\n")]))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "header" in e.value.details()
