#!/usr/bin/env python3
"""pyvmomi (the real VMware Python SDK) against ferry's mock vCenter.

Driven by mocks/tests/vcenter_pyvmomi.rs, which starts the mock on the `small`
scenario and passes its connection details as JSON on stdin. Every check raises on
failure; the last line of stdout is a JSON summary the Rust test asserts on too.

Most tasks are polled through Task.info, as ferry does; some go through pyVim's
WaitForTask, which uses PropertyCollector.CreateFilter / WaitForUpdates /
DestroyPropertyFilter.
"""
import json
import os
import ssl
import sys
import time
import urllib.request

from pyVim.connect import SmartConnect
from pyVim.task import WaitForTask
from pyVmomi import vim, vmodl

cfg = json.load(sys.stdin)
host, port = cfg["host"], cfg["port"]
ctx = ssl.create_default_context(cafile=cfg["ca"])  # verification on
summary = {}


def check(cond, what):
    if not cond:
        raise AssertionError(what)


def admin(path, body=None):
    req = urllib.request.Request(
        "https://%s:%d/admin/%s" % (host, port, path),
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": "Bearer " + cfg["admin_token"],
                 "Content-Type": "application/json"},
        method="GET" if body is None else "POST")
    with urllib.request.urlopen(req, context=ctx) as r:
        data = r.read()
        return json.loads(data) if data else None


def wait(task, timeout=60):
    deadline = time.time() + timeout
    while True:
        info = task.info
        if info.state in (vim.TaskInfo.State.success, vim.TaskInfo.State.error):
            return info
        check(time.time() < deadline, "task %s did not finish" % task._moId)
        time.sleep(0.05)


def disks_of(devices):
    return [d for d in devices if isinstance(d, vim.vm.device.VirtualDisk)]


def areas(vm, snap, key, change_id, capacity):
    """QueryChangedDiskAreas paged until the capacity, as ferry does."""
    out, start, calls = [], 0, 0
    while start < capacity:
        r = vm.QueryChangedDiskAreas(snap, key, start, change_id)
        calls += 1
        check(r.startOffset == start, "answer starts where asked")
        check(r.length > 0, "answer covers something")
        out += [(a.start, a.length) for a in r.changedArea]
        start = r.startOffset + r.length
    return out, calls


# ---- login -------------------------------------------------------------------
si = SmartConnect(host=host, port=port, user=cfg["user"], pwd=cfg["password"],
                  sslContext=ctx)
content = si.RetrieveContent()
check(content.about.apiType == "VirtualCenter", "a vCenter")
check(content.sessionManager.currentSession.userName == cfg["user"], "session user")
summary["api_version"] = content.about.apiVersion

try:
    SmartConnect(host=host, port=port, user=cfg["user"], pwd="wrong", sslContext=ctx)
    raise AssertionError("a wrong password must be refused")
except vim.fault.InvalidLogin:
    summary["bad_password"] = "InvalidLogin"

# ---- inventory through the PropertyCollector, paged ---------------------------
view = content.viewManager.CreateContainerView(content.rootFolder, [vim.VirtualMachine], True)
pc = content.propertyCollector
spec = vmodl.query.PropertyCollector.FilterSpec(
    objectSet=[vmodl.query.PropertyCollector.ObjectSpec(
        obj=view, skip=True,
        selectSet=[vmodl.query.PropertyCollector.TraversalSpec(
            name="view", type=vim.view.ContainerView, path="view", skip=False)])],
    propSet=[vmodl.query.PropertyCollector.PropertySpec(
        type=vim.VirtualMachine,
        pathSet=["name", "config.hardware.device", "config.keyId",
                 "config.changeTrackingEnabled", "runtime.host"])])
res = pc.RetrievePropertiesEx([spec], vmodl.query.PropertyCollector.RetrieveOptions(maxObjects=2))
objects, pages = list(res.objects), 1
while res.token:
    res = pc.ContinueRetrievePropertiesEx(res.token)
    objects += res.objects
    pages += 1
contents = pc.RetrieveContents([spec])  # RetrieveProperties: no paging
check(len(contents) == len(objects), "RetrieveContents sees the same VMs")
view.DestroyView()
inventory = {}
for oc in objects:
    props = {p.name: p.val for p in oc.propSet}
    key = props.get("config.keyId")
    inventory[props["name"]] = {
        "moref": oc.obj._moId,
        "key_provider": key.providerId.id if key else None,
        "key_id": key.keyId if key else None,
        "cbt": props["config.changeTrackingEnabled"],
        "host": props["runtime.host"]._moId,
        "disks": [{
            "key": d.key,
            "file": d.backing.fileName,
            "capacity": d.capacityInBytes,
            "key_provider": d.backing.keyId.providerId.id if d.backing.keyId else None,
            "change_id": d.backing.changeId,
        } for d in disks_of(props["config.hardware.device"])],
    }
summary["inventory"] = inventory
summary["pages"] = pages
vms = {oc.obj.name: oc.obj for oc in objects}  # attribute access goes through Fetch
check(vms["tenant-a-web"].config.keyId.providerId.id == "KMS-A", "Fetch of config.keyId")

# ---- snapshots and CBT -------------------------------------------------------
web = vms["tenant-a-web"]
cap = inventory["tenant-a-web"]["disks"][0]["capacity"]
task = web.CreateSnapshot_Task("ferry-1", "ferry backup job 1", False, False)
check(WaitForTask(task) == "success", "WaitForTask (filters + WaitForUpdates)")
s1 = task.info.result
check(isinstance(s1, vim.vm.Snapshot), "the task result is the snapshot")
check(web.snapshot.rootSnapshotList[0].name == "ferry-1", "snapshot tree")
d1 = disks_of(s1.config.hardware.device)[0]
summary["s1_file"] = d1.backing.fileName
full, _ = areas(web, s1, d1.key, "*", cap)
summary["full_areas_bytes"] = sum(l for _, l in full)

# Guest writes between the two snapshots (64 KiB CBT blocks).
MIB = 1 << 20
admin("vms/tenant-a-web/disks/2000/write", {"offset": MIB + 100, "hex": "66657272792d6d6f636b"})
admin("vms/tenant-a-web/disks/2000/write", {"offset": 5 * MIB, "fill": 171, "len": 70000})
info = wait(web.CreateSnapshot_Task("ferry-2", "ferry backup job 2", False, False))
check(info.state == "success", "second snapshot")
s2 = info.result
d2 = disks_of(s2.config.hardware.device)[0]
changed, _ = areas(web, s2, d2.key, d1.backing.changeId, cap)
summary["changed"] = changed
check(changed == [(MIB, 65536), (5 * MIB, 131072)], "CBT reports exactly the written blocks: %s" % changed)
# Nothing changed after the second snapshot yet.
none, _ = areas(web, s2, d2.key, d2.backing.changeId, cap)
check(none == [], "no change since the snapshot's own changeId")

info = wait(s1.RemoveSnapshot_Task(False, True))
check(info.state == "success", "RemoveSnapshot_Task succeeds: %s" % info.error)
check(info.entity._moId == web._moId, "a RemoveSnapshot task's entity is the VM")
check(len(web.snapshot.rootSnapshotList) == 1, "one snapshot left")
check(disks_of(s2.config.hardware.device)[0].backing.fileName == d1.backing.fileName,
      "after consolidation the remaining snapshot freezes the base file")
try:
    web.QueryChangedDiskAreas(s2, d2.key, 0, "52 00 00 00 00 00 00 00-00 00 00 00 00 00 00 00/1")
    raise AssertionError("an unknown changeId must fault")
except vim.fault.FileFault as e:
    summary["unknown_change_id"] = type(e).__name__

# ---- hot-add rules -----------------------------------------------------------
db = vms["tenant-b-db"]
info = wait(db.CreateSnapshot_Task("ferry-3", "ferry backup job 3", False, False))
check(info.state == "success", "tenant B snapshot")
sb = info.result
db_disk = disks_of(sb.config.hardware.device)[0]
proxy_a, proxy_nbd = vms["proxy-a"], vms["proxy-nbd"]


def hot_add(proxy, disk):
    spec = vim.vm.ConfigSpec(deviceChange=[vim.vm.device.VirtualDeviceSpec(
        operation="add",
        device=vim.vm.device.VirtualDisk(
            key=-1, controllerKey=1000, capacityInBytes=disk.capacityInBytes,
            backing=vim.vm.device.VirtualDisk.FlatVer2BackingInfo(
                fileName=disk.backing.fileName, diskMode="independent_nonpersistent")))])
    return wait(proxy.ReconfigVM_Task(spec))


refused = hot_add(proxy_a, db_disk)  # KMS-B disk, KMS-A proxy
check(refused.state == "error", "hot-add across key providers is refused")
check(isinstance(refused.error, vim.fault.GenericVmConfigFault), "a GenericVmConfigFault")
check("key providers differ" in refused.error.msg, refused.error.msg)
summary["cross_kms_fault"] = type(refused.error).__name__
summary["cross_kms_message"] = refused.error.msg
refused = hot_add(proxy_nbd, disks_of(s2.config.hardware.device)[0])  # encrypted disk, plain proxy
check(refused.state == "error", "an encrypted disk cannot go to an unencrypted proxy")

web_disk = disks_of(s2.config.hardware.device)[0]
accepted = hot_add(proxy_a, web_disk)
check(accepted.state == "success", "same key provider: accepted: %s" % accepted.error)
attached = [d for d in disks_of(proxy_a.config.hardware.device)
            if d.backing.fileName == web_disk.backing.fileName]
check(len(attached) == 1, "the proxy shows the hot-added disk")
att = attached[0]
check(att.backing.diskMode == "independent_nonpersistent", "non-persistent")
entry = os.path.join(cfg["device_dirs"]["proxy-a"], att.backing.uuid.replace("-", "").lower())
check(os.path.exists(entry), "device entry %s appears" % entry)
with open(entry, "rb") as f:
    check(os.fstat(f.fileno()).st_size == cap, "device has the disk's size")
    f.seek(MIB + 100)
    check(f.read(10) == b"ferry-mock", "the device holds the snapshot's content")
    f.seek(5 * MIB)
    check(f.read(70000) == b"\xab" * 70000, "both writes are in the snapshot")
summary["hotadd_device"] = entry
summary["hotadd_key"] = att.key

# NBD ticket for the snapshot disk (the contract's URL form).
ticket = content.sessionManager.AcquireGenericServiceTicket(
    vim.SessionManager.HttpServiceRequestSpec(
        method="httpGet",
        url="nbd://%s/%s/%s/%d" % (db.runtime.host._moId, db._moId, sb._moId, db_disk.key)))
check(len(ticket.id) >= 32 and ticket.hostName, "ticket id and host")
summary["ticket_host"] = ticket.hostName

# Snapshot removal is refused while its disk is hot-added.
locked = wait(s2.RemoveSnapshot_Task(False, True))
check(locked.state == "error" and isinstance(locked.error, vim.fault.FileLocked), "FileLocked while attached")

# Detach: remove the device, never destroy the file.
detach = wait(proxy_a.ReconfigVM_Task(vim.vm.ConfigSpec(deviceChange=[
    vim.vm.device.VirtualDeviceSpec(operation="remove", device=att)])))
check(detach.state == "success", "detach succeeds: %s" % detach.error)
check(not os.path.exists(entry), "device entry disappears on detach")
check(not [d for d in disks_of(proxy_a.config.hardware.device) if d.key == att.key], "device gone")

for s in (s2, sb):
    check(WaitForTask(s.RemoveSnapshot_Task(False, True)) == "success", "cleanup removal")
check(web.snapshot is None and db.snapshot is None, "no snapshot left")

state = admin("state")
check(sum(len(v["snapshots"]) for v in state["vms"]) == 0, "admin state: no snapshots")
check(sum(len(v["attached"]) for v in state["vms"]) == 0, "admin state: nothing attached")

content.sessionManager.Logout()
try:
    content.sessionManager.currentSession
    raise AssertionError("calls after Logout must fail")
except vim.fault.NotAuthenticated:
    summary["after_logout"] = "NotAuthenticated"

print(json.dumps(summary))
