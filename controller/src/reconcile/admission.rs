//! Who is admitted to a mesh: the enrolment mode, the MeshNode's `approved` and the record's
//! approval (by an admin or a token).

use sidenet_crds::{EnrollmentMode, Mesh, MeshNode};

use crate::reconcile::store::NodeRecord;

/// Whether a node is admitted: always in `auto` mode; in `approval` and `token` mode when its
/// MeshNode says `approved: true` or its record was approved (`sidenetctl approve`, a token).
pub fn approved(mesh: &Mesh, manifest: Option<&MeshNode>, rec: Option<&NodeRecord>) -> bool {
    match mesh.spec.enrollment.mode {
        EnrollmentMode::Auto => true,
        EnrollmentMode::Approval | EnrollmentMode::Token => {
            manifest.is_some_and(|m| m.spec.approved) || rec.is_some_and(|r| r.approved)
        }
    }
}
