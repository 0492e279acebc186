spring-hello = لقد حلّ الربيع يا { $first_name }! هل تريد رمزًا لمجموعة الربيع؟
spring-btn-yes = نعم، من فضلك
spring-btn-no = ليس الآن
spring-code = رمزك: SPRING15 (خصم 15% حتى نهاية مايو).
spring-bye = لا مشكلة. سنبقيك على اطلاع.
